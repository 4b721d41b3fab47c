"""``python -m studies mlflow``: an MLflow server over the studies' own tracking stores.

Every study directory (``<storage>/<study>-<scale>/``) has its own sqlite store
``mlflow.db`` with its artifacts in ``mlartifacts/``. ``--study NAME`` (and
``--scale S``) selects one store; without them every store under ``--storage``
is served, one server per store on consecutive ports (``--port``,
``--port + 1`` ...), since an MLflow server reads a single backend store. The
command prints one URL per store, waits until each server answers, and runs
until Ctrl-C or SIGTERM, then stops the servers it started (each in its own
process group, with its uvicorn workers).

Servers bind to 127.0.0.1 unless ``--host`` says otherwise; a DNS name or a
non-loopback address is the user's explicit choice (MLflow has no auth here).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from regtune.space import ConfigError
from studies.guard import check_storage_value
from studies.tracking import experiment_links

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"


def find_stores(storage: str | os.PathLike, study: str | None = None, scale: str | None = None) -> list[Path]:
    """Study directories under ``storage`` that hold an MLflow store, optionally one study / scale."""
    check_storage_value(storage)
    root = Path(storage).expanduser().resolve()
    if not root.is_dir():
        raise ConfigError(f"--storage {str(root)!r} is not a directory: expected where `studies run` wrote its results")
    pattern = f"{study}-{scale}" if study and scale else f"{study}-*" if study else "*"
    stores = sorted(p.parent for p in root.glob(f"{pattern}/{DB_FILE}"))
    if study and not scale:  # "a-b" must not match study "a" with scale "b-c" of another study "a-b"
        stores = [p for p in stores if p.name.rsplit("-", 1)[0] == study]
    if not stores:
        known = sorted(p.parent.name for p in root.glob(f"*/{DB_FILE}"))
        what = f"study {study!r}" + (f" at scale {scale!r}" if scale else "") if study else "any study"
        raise ConfigError(f"no MLflow store of {what} under {str(root)!r}: expected <study>-<scale>/{DB_FILE}; "
                          f"found: {', '.join(known) or 'none (run a study first)'}")
    return stores


def server_command(sdir: Path, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{sdir / DB_FILE}",
            "--artifacts-destination", str(sdir / ARTIFACTS_DIR),
            "--host", host, "--port", str(port), "--workers", "1"]


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the MLflow server for {url} exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the MLflow server at {url} did not answer within {timeout:.0f} s")


def stop(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM each server's process group (the server and its workers), SIGKILL after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.1)
        if all(p.poll() is not None for p in procs):
            return


def serve(storage: str | os.PathLike, study: str | None = None, scale: str | None = None, *,
          host: str = "127.0.0.1", port: int = 5000, ready_timeout: float = 120.0,
          log: Callable[[str], None] = print) -> int:
    """Start one MLflow server per selected store, print the URLs, block until interrupted."""
    stores = find_stores(storage, study, scale)
    ports = list(range(port, port + len(stores)))
    busy = [p for p in ports if not port_free(host, p)]
    if busy:
        raise ConfigError(f"--port {busy[0]} on {host} is in use: pass a free --port"
                          + (f" ({len(stores)} stores need {len(stores)} ports from it)" if len(stores) > 1 else ""))
    if host not in ("127.0.0.1", "localhost", "::1"):
        log(f"warning: serving on {host}: anyone who can reach it can read and change the runs (no auth)")
    procs: list[subprocess.Popen] = []
    stopping = {"now": False}

    def _stop(signum, frame):
        stopping["now"] = True

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        for sdir, p in zip(stores, ports):
            (sdir / ARTIFACTS_DIR).mkdir(exist_ok=True)
            with open(sdir / "mlflow_server.log", "ab") as server_log:  # the child keeps its own copy
                procs.append(subprocess.Popen(server_command(sdir, host, p), start_new_session=True,
                                              stdout=subprocess.DEVNULL, stderr=server_log))
        shown = "[" + host + "]" if ":" in host else host
        for sdir, p, proc in zip(stores, ports, procs):
            url = f"http://{shown}:{p}"
            wait_ready(url, proc, ready_timeout)
            log(f"MLflow for {sdir.name}: {url}  (store sqlite:///{sdir / DB_FILE})")
            for link in experiment_links(sdir, url):  # opens on the runs table, not MLflow 3's GenAI overview
                log(f"  {link}")
        log("Ctrl-C stops the server" + ("s" if len(procs) > 1 else ""))
        sys.stdout.flush()
        while not stopping["now"]:
            dead = [p for p in procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"an MLflow server exited with status {dead[0].returncode}; "
                                   f"see {stores[procs.index(dead[0])] / 'mlflow_server.log'}")
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        stop(procs)
        signal.signal(signal.SIGTERM, previous)
    return 0
