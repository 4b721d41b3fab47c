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
from studies.engine.guard import check_storage_value, terminate
from studies.engine.storage import local_root
from studies.engine.tracking import experiment_links

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"


def find_stores(storage: str | os.PathLike, study: str | None = None, scale: str | None = None) -> list[Path]:
    """Study directories under ``storage`` that hold an MLflow store, optionally one study / scale."""
    check_storage_value(storage)
    root = local_root(storage)  # s3://bucket/prefix: the stores are in its local mirror (studies.engine.storage)
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


def wait_ready(url: str, proc: subprocess.Popen, timeout: float, stopping: Callable[[], bool] = lambda: False) -> bool:
    """Wait until the server answers ``/health``; False if ``stopping()`` turned true first (Ctrl-C)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stopping():
            return False
        if proc.poll() is not None:
            raise RuntimeError(f"the MLflow server for {url} exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the MLflow server at {url} did not answer within {timeout:.0f} s")


def _children() -> dict[int, list[int]]:
    """ppid -> pids of this machine's processes (from /proc)."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces
        out.setdefault(ppid, []).append(int(entry))
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and every live descendant (an MLflow server's uvicorn workers and job-runner consumers)."""
    children, tree, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def stop(procs: list[subprocess.Popen], grace: float = 5.0, kill_wait: float = 3.0) -> list[int]:
    """Stop each server and every process it started: SIGTERM to its process group and to each descendant,
    SIGKILL to what is left after ``grace`` seconds; wait (by pid, at most ``kill_wait`` more seconds) until
    they are gone. Returns the pids still alive then (none expected)."""
    pids = sorted({q for p in procs if p.poll() is None for q in process_tree(p.pid)})

    def group(sig: int) -> None:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    def reap() -> None:
        for p in procs:
            p.poll()  # reap the servers (our children)

    return terminate(pids, (grace, kill_wait), also=group, reap=reap)


def serve(storage: str | os.PathLike, study: str | None = None, scale: str | None = None, *,
          host: str = "127.0.0.1", port: int = 5000, ready_timeout: float = 120.0,
          log: Callable[[str], None] = print) -> int:
    """Start one MLflow server per selected store, print the URLs, block until Ctrl-C or SIGTERM; then stop
    every server it started (also while they are still starting), within about 10 s."""
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

    def _stop(signum, frame):  # a flag, never an exception: a server being started is always recorded
        stopping["now"] = True

    # installed explicitly: a process started in the background by a non-interactive shell inherits SIGINT
    # ignored, and Python would then never see Ctrl-C
    previous = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for sdir, p in zip(stores, ports):
            if stopping["now"]:
                break
            (sdir / ARTIFACTS_DIR).mkdir(exist_ok=True)
            with open(sdir / "mlflow_server.log", "ab") as server_log:  # the child keeps its own copy
                procs.append(subprocess.Popen(server_command(sdir, host, p), start_new_session=True,
                                              stdout=subprocess.DEVNULL, stderr=server_log))
        shown = "[" + host + "]" if ":" in host else host
        for sdir, p, proc in zip(stores, ports, procs):
            url = f"http://{shown}:{p}"
            if not wait_ready(url, proc, ready_timeout, lambda: stopping["now"]):
                break
            log(f"MLflow for {sdir.name}: {url}  (store sqlite:///{sdir / DB_FILE})")
            for link in experiment_links(sdir, url):  # opens on the runs table, not MLflow 3's GenAI overview
                log(f"  {link}")
        if not stopping["now"]:
            log("Ctrl-C stops the server" + ("s" if len(procs) > 1 else ""))
        sys.stdout.flush()
        while not stopping["now"]:
            dead = [p for p in procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"an MLflow server exited with status {dead[0].returncode}; "
                                   f"see {stores[procs.index(dead[0])] / 'mlflow_server.log'}")
            time.sleep(0.2)
    finally:
        left = stop(procs)
        for s, handler in previous.items():
            signal.signal(s, handler)
    if left:
        raise RuntimeError(f"MLflow server processes {left} did not stop")
    if stopping["now"]:
        log("stopped")
    return 0
