"""Fail fast on services a study needs but cannot reach: an MLflow server (``--mlflow-uri http://...``) and a
Ray cluster (``--address`` or ``$RAY_ADDRESS``).

Run by the driver before Ray starts and before anything is written. An unreachable service is one line
(``ConfigError``, exit 2) naming what was tried, within about ``TIMEOUT`` seconds per service, instead of
MLflow's minutes of retries or ``ray.init``'s long wait for a GCS that is not there.

Ray addresses:

* ``host:port``: the cluster's GCS (``ray start --head`` prints it; port 6379 by default): a TCP connect,
  then Ray's own GCS client asks it for its cluster id.
* ``ray://host:port``: the Ray Client server of a cluster (port 10001 by default): a TCP connect.
* ``auto``: the cluster ``ray start`` last started on this machine (Ray's ``/tmp/ray/ray_current_cluster``);
  none recorded is an error, else its GCS is checked as above.
* ``local`` (or nothing): a local Ray is started; nothing to check.
* ``http(s)://host:port`` is a dashboard / Jobs API address: ``ray job submit --address`` takes it, a driver
  cannot connect to it. It is checked (``GET /api/version``) so the error says whether the cluster is up.

MLflow: ``http(s)://`` URIs get ``GET <uri>/health``; other stores (``sqlite:///``, ``databricks``) are left
to MLflow.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from regtune.space import ConfigError
from trainables.ray_internals import UNKNOWN, gcs_answers, recorded_cluster

TIMEOUT = 5.0  # seconds per connect / request


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code}"
    if isinstance(e, urllib.error.URLError):
        e = e.reason if isinstance(e.reason, BaseException) else e
    if isinstance(e, (TimeoutError, socket.timeout)):
        return f"no answer within {TIMEOUT:g} s"
    if isinstance(e, socket.gaierror):
        return "host name not found"
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _http_get(url: str) -> str | None:
    """None if ``url`` answers 200, else why not."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
            return None if r.status == 200 else f"HTTP {r.status}"
    except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts, connection refused, bad URL
        return _reason(e)


def _tcp(host: str, port: int) -> str | None:
    """None if a TCP connection to ``host:port`` opens, else why not."""
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT):
            return None
    except OSError as e:
        return _reason(e)


def _gcs(address: str) -> str | None:
    """None if a Ray GCS answers at ``address`` (a TCP port that is open is not enough: a proxy may hold it)."""
    outcome: dict[str, str | None] = {}

    def probe() -> None:
        try:
            gcs_answers(address)
            outcome["why"] = None
        except Exception as e:  # noqa: BLE001 - RpcError and friends: reported in one line
            if "auth" in type(e).__name__.lower() or "InvalidAuthToken" in str(e):  # ray.init would fail alike
                outcome["why"] = ("it requires token authentication and refused this process: set RAY_AUTH_MODE=token "
                                  "and the cluster's token (RAY_AUTH_TOKEN or ~/.ray/auth_token)")
                return
            outcome["why"] = f"not a Ray GCS: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"

    thread = threading.Thread(target=probe, name="regtune-gcs-probe", daemon=True)
    saved = os.dup(2)  # Ray's C++ client logs each failed attempt to stderr: the user gets our one line instead
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            thread.start()
            thread.join(2 * TIMEOUT)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    return outcome["why"] if "why" in outcome else f"no answer from a Ray GCS within {2 * TIMEOUT:g} s"


def _host_port(text: str, what: str, allowed: str) -> tuple[str, int]:
    parts = urlsplit(text if "://" in text else f"tcp://{text}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise ConfigError(f"{what} {text!r} is not allowed: expected {allowed}")
    return parts.hostname, port


def check_mlflow(uri: str | None) -> None:
    """An ``http(s)://`` tracking server must answer ``GET /health``."""
    if not uri or not uri.lower().startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    why = _http_get(url)
    if why:
        raise ConfigError(
            f"--mlflow-uri {uri!r} is not reachable (GET {url}: {why}): expected a running MLflow server "
            "(`mlflow server --host ... --port ...`), or leave --mlflow-uri out for the study's own sqlite store"
        )


def check_ray(address: str | None) -> None:
    """``--address`` (else ``$RAY_ADDRESS``) must name a Ray cluster that answers."""
    flag = "--address"
    if not address:
        address, flag = os.environ.get("RAY_ADDRESS") or None, "$RAY_ADDRESS"
    if not address or address == "local":
        return
    allowed = "host:port (the GCS, port 6379 by default), ray://host:port, auto, or local"
    if address == "auto":
        found = recorded_cluster()
        if found is None:
            raise ConfigError(f"{flag} 'auto' found no running Ray cluster on this machine (none recorded by "
                              "`ray start`): start one with `ray start --head`, or leave the address out for a local Ray")
        if found == UNKNOWN:  # Ray's private lookup moved: let ray.init decide
            return
        target, kind = found, "Ray GCS"
    else:
        target, kind = address, "Ray Client server" if address.startswith("ray://") else "Ray GCS"
    if target.lower().startswith(("http://", "https://")):
        url = target.rstrip("/") + "/api/version"
        why = _http_get(url)
        state = f"not reachable (GET {url}: {why})" if why else "a Ray dashboard that answers"
        raise ConfigError(f"{flag} {address!r} is {state}: a study driver needs {allowed}; a dashboard address is "
                          "for `ray job submit --address URL -- python -m studies run ...`")
    if "://" in target and not target.startswith("ray://"):
        raise ConfigError(f"{flag} {address!r} is not allowed: expected {allowed}")
    host, port = _host_port(target, flag, allowed)
    why = _tcp(host, port)
    if why is None and kind == "Ray GCS":
        why = _gcs(f"{host}:{port}")
    if why:
        tried = f" (found {target})" if target != address else ""
        if why.startswith("it requires token"):
            raise ConfigError(f"{flag} {address!r}{tried}: the {kind} at {host}:{port} answers but {why}")
        raise ConfigError(f"{flag} {address!r}{tried}: no {kind} reachable at {host}:{port} ({why}): "
                          "expected a running cluster (`ray start --head` prints its address)")


def check_services(mlflow_uri: str | None, address: str | None) -> None:
    """Both checks; the first failure raises ``ConfigError`` (one line, exit 2)."""
    check_ray(address)
    check_mlflow(mlflow_uri)
