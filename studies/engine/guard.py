"""Fail-fast checks and crash safety of the study driver.

* ``check_storage``: ``--storage`` is a local or shared-filesystem path (an
  NFS/EFS mount on a cluster) or an ``s3://bucket/prefix`` URI (``studies.engine.storage``:
  the study dir is then a local mirror), and the study directory can be
  created and written; else a one-line ``ConfigError`` (exit 2) before Ray starts.
* ``check_data_dirs``: every ``data_dir`` a cell's fixed config names exists.
* ``DriverLock``: one driver per study directory. The lock is an ``flock`` on
  ``<study dir>/driver.lock``, so the kernel frees it when the driver dies, even
  by SIGKILL; a second driver on the same directory exits with status 2. The file
  records the holder's pid, host and local Ray session, so the next driver can
  stop what a killed one left behind (``stop_stale_ray``). With S3 storage the
  driver also holds the study's lease in the bucket (``studies.engine.s3lease``).
* ``stop_stale_ray``: a driver that started local Ray and was SIGKILLed leaves
  Ray's agents (and for about a second its trial workers) running. They are
  found by the files they hold open in that Ray session's directory and killed
  by pid before the study resumes, so nothing of the old run writes into the
  study directory while the new one does.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from regtune.space import ConfigError
from studies.engine import storage as storage_io

LOCK_FILE = "driver.lock"
URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def check_storage_value(storage: str | os.PathLike) -> None:
    """A directory (a shared mount on a multi-node cluster) or ``s3://bucket/prefix``; other URIs are refused."""
    storage_io.parse(storage)


def check_storage(sdir: Path) -> None:
    """Create the study directory and write a probe file in it, or fail with one line."""
    try:
        sdir.mkdir(parents=True, exist_ok=True)
        probe = sdir / f".write_probe.{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"--storage: the study directory {str(sdir)!r} is not writable ({e.strerror or e}); "
            "expected a directory this user can create files in"
        ) from None


def check_data_dirs(configs: Iterable[tuple[str, Mapping[str, Any]]]) -> None:
    """``(cell name, fixed config)`` pairs: a ``data_dir`` that is set must be an existing directory."""
    for cell, config in configs:
        value = config.get("data_dir")
        if value and not Path(os.fspath(value)).expanduser().is_dir():
            raise ConfigError(
                f"data_dir={str(value)!r} of cell {cell!r} is not a directory: expected the prepared data "
                "(on a cluster a path every node mounts)"
            )


# --------------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has exited: only its parent has not reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def session_processes(session_dir: str | os.PathLike) -> list[int]:
    """Live processes of this user that hold a file open under a Ray session directory."""
    root = os.path.realpath(os.fspath(session_dir)).rstrip("/") + "/"
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        fd_dir = f"/proc/{entry}/fd"
        try:
            if os.stat(f"/proc/{entry}").st_uid != os.getuid():
                continue
            links = [os.readlink(f"{fd_dir}/{fd}") for fd in os.listdir(fd_dir)]
        except OSError:
            continue
        if any(link.startswith(root) for link in links) and pid_alive(int(entry)):
            found.append(int(entry))
    return sorted(found)


def terminate(pids: list[int], waits: tuple[float, float] = (3.0, 3.0),
              also: Callable[[int], None] = lambda sig: None, reap: Callable[[], None] = lambda: None) -> list[int]:
    """SIGTERM ``pids``, SIGKILL what is left after ``waits[0]`` seconds, wait at most ``waits[1]`` more; return the
    pids still alive then. ``also(sig)`` signals more (e.g. a process group) with each signal; ``reap()`` collects
    our own exited children while waiting (a zombie child counts as alive until it is reaped)."""
    for sig, wait in zip((signal.SIGTERM, signal.SIGKILL), waits):
        also(sig)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            reap()
            pids = [p for p in pids if pid_alive(p)]
            if not pids:
                return []
            time.sleep(0.05)
    return pids


def stop_stale_ray(session_dir: str | os.PathLike, grace: float = 3.0) -> list[int]:
    """SIGTERM, then SIGKILL, every leftover process of a dead driver's local Ray session."""
    terminate(session_processes(session_dir), (grace, grace))
    return session_processes(session_dir)


class DriverLock:
    """Exclusive ownership of a study directory by one driver process (re-entrant within the process)."""

    _held: ClassVar[dict[str, DriverLock]] = {}

    def __init__(self, sdir: Path):
        self.path = Path(sdir).resolve() / LOCK_FILE
        self.fd: int | None = None
        self.lease = None
        self.previous: dict[str, Any] = {}

    def acquire(self) -> DriverLock:
        held = DriverLock._held.get(str(self.path))
        if held is not None and held.fd is not None:
            return held
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read(fd)
            os.close(fd)
            raise ConfigError(
                f"the study directory {str(self.path.parent)!r} is in use by another driver (pid {holder.get('pid')} "
                f"on {holder.get('host')}, since {holder.get('started')}): wait for it, or stop it and run again"
            ) from None
        try:  # s3:// storage: the study's lease in the bucket too (another machine may run a driver)
            self.lease = storage_io.acquire_lease(self.path.parent, pid_alive)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.previous = _read(fd)
        self.record(ray_session=None)
        DriverLock._held[str(self.path)] = self
        return self

    def record(self, **fields: Any) -> None:
        assert self.fd is not None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"), **fields}
        data = json.dumps(info).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        os.fsync(self.fd)

    def stop_leftovers(self, log: Callable[[str], None]) -> None:
        """Kill the local Ray processes a SIGKILLed previous driver of this directory left running."""
        prev = self.previous
        session = prev.get("ray_session")
        if not session or prev.get("host") != socket.gethostname() or not Path(session).exists():
            return
        pids = session_processes(session)
        if pids:
            log(f"stopping {len(pids)} leftover Ray processes of the previous driver (pid {prev.get('pid')}): "
                f"{' '.join(map(str, pids))}")
            left = stop_stale_ray(session)
            if left:
                raise ConfigError(f"leftover Ray processes {left} of session {session!r} could not be stopped")

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
            DriverLock._held.pop(str(self.path), None)


def restore_ctrl_c() -> None:
    """Make Ctrl-C (SIGINT) interrupt this command even when it was started with SIGINT ignored: a command
    started in the background by a non-interactive shell (``cmd &``, a CI script) inherits SIGINT as
    ``SIG_IGN``, and Python then never raises ``KeyboardInterrupt``. Called first by the CLI."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def sigterm_as_sigint() -> None:
    """Let SIGTERM (``ray job stop``, a cluster scheduler) stop a study like Ctrl-C: Tune saves its state,
    the study run is marked KILLED, and running the command again resumes."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(os.getpid(), signal.SIGINT))


def _read(fd: int) -> dict[str, Any]:
    try:
        size = os.fstat(fd).st_size
        return json.loads(os.pread(fd, size, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def ray_session_dir() -> str | None:
    """The session directory of the Ray instance this process is connected to (Ray's temp dir / session name;
    None if it cannot be told)."""
    try:
        import ray

        ctx = ray.get_runtime_context()
        return os.path.join(ctx.get_temp_dir(), ctx.get_session_name())
    except Exception:  # noqa: BLE001 - only used to clean up after a crash; never fail a study over it
        return None


# --------------------------------------------------------------------------
# one stage's Tune experiment: fresh start, restore, and settling after fit()
PLAN_FILE = "stage_plan.json"
ABANDONED = ".abandoned"


def _trial_dirs(exp_dir: Path) -> list[Path]:
    return sorted(p.parent for p in exp_dir.glob("*/params.json"))


def _trial_id(trial_dir: Path) -> str:
    """The trial id in a trial dir's name ``<cell>_<trial_id>`` (the cell's name may hold underscores)."""
    try:
        cell = json.loads((trial_dir / "params.json").read_text())["__extras"]["cell"]
    except (OSError, ValueError, KeyError, TypeError):
        return trial_dir.name.rsplit("_", 1)[-1]
    return trial_dir.name[len(cell) + 1:]


def _move_aside(trial_dirs: list[Path], exp_dir: Path) -> None:
    dest = exp_dir.parent / ABANDONED / exp_dir.name
    dest.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for d in trial_dirs:
        os.replace(d, dest / f"{d.name}.{stamp}")
        storage_io.moved(d, dest / f"{d.name}.{stamp}")  # s3:// storage: in the bucket too


def start_fresh(exp_dir: Path, num_samples: int, tracker, stage: str, log: Callable[[str], None]) -> None:
    """Before a new experiment: set aside trial dirs (and MLflow runs) of a run that died before Tune saved
    a restorable state, and record how many trials the stage plans."""
    stale = _trial_dirs(exp_dir)
    if stale:
        log(f"[{stage}] setting aside {len(stale)} trial dirs of an earlier run with no restorable state")
        _move_aside(stale, exp_dir)
    tracker.settle_runs(stage, {})
    exp_dir.mkdir(parents=True, exist_ok=True)
    (exp_dir / PLAN_FILE).write_text(json.dumps({"num_samples": num_samples}))
    storage_io.push(exp_dir / PLAN_FILE)


class SignalWatch:
    """Whether ``tuner.fit()`` was interrupted. On SIGINT (or SIGUSR1) Tune saves its state and ``fit`` returns
    normally, with the running trials shown as terminated: only the signal tells. Tune's handler puts back the
    handler it found, which is this one, so finding ours installed after ``fit`` means Tune's fired."""

    def __init__(self) -> None:
        self.hit = False
        self.active = threading.current_thread() is threading.main_thread()
        self.handler = self._handler

    def _handler(self, signum, frame) -> None:
        self.hit = True  # a second Ctrl-C, or Tune's handler disabled
        raise KeyboardInterrupt

    def __enter__(self) -> "SignalWatch":
        if self.active:
            self.previous = {s: signal.signal(s, self.handler) for s in (signal.SIGINT, signal.SIGUSR1)}
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            for s, prev in self.previous.items():
                self.hit |= signal.getsignal(s) is self.handler
                signal.signal(s, prev)


def settle_stage(results, exp_dir: Path, tracker, stage: str, log: Callable[[str], None],
                 interrupted: bool = False, unstarted: int = 0) -> list[str]:
    """After ``tuner.fit()``: raise ``KeyboardInterrupt`` if it was interrupted (a signal, or fewer trials
    than planned, less the ``unstarted`` trials of cells a permanent error stopped); else set aside trial
    dirs the final experiment does not own (started after Tune's last state snapshot before a crash) and
    make MLflow agree with Tune: one terminated run per trial, runs of set-aside trials deleted. Returns the
    trial dir names."""
    plan = exp_dir / PLAN_FILE
    expected = json.loads(plan.read_text()).get("num_samples", 0) if plan.exists() else 0
    if interrupted or len(results) < expected - unstarted:
        log(f"[{stage}] interrupted with {len(results)} of {expected} trials started; its state is saved")
        raise KeyboardInterrupt
    statuses, names = {}, []
    for r in results:
        tdir = Path(r.path)
        names.append(tdir.name)
        statuses[(r.metrics or {}).get("trial_id") or _trial_id(tdir)] = "FAILED" if r.error else "FINISHED"
    ghosts = [d for d in _trial_dirs(exp_dir) if d.name not in names]
    if ghosts:
        log(f"[{stage}] setting aside {len(ghosts)} trial dirs that the restored experiment does not own")
        _move_aside(ghosts, exp_dir)
    tracker.settle_runs(stage, statuses)
    return sorted(names)
