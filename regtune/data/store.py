"""Writing a data set into the data directory safely, for ``python -m studies prepare``.

* ``exclusive(target)``: one writer of ``target`` at a time, across processes and
  (on a shared filesystem that supports ``flock``) across nodes: a ``filelock``
  lock file ``.<name>.lock`` beside the target. A second prepare waits, says so,
  and then finds the data set complete.
* ``staging(target)``: a fresh temporary directory ``.<name>.tmp-*`` beside the
  target (same filesystem, so the final rename is atomic), removed on failure.
* ``publish(built, target)``: rename the built directory into place. A previous
  ``target`` is renamed aside first and removed after, so a reader sees the old
  complete copy, no copy (a clear "missing" error), or the new complete copy,
  never a mixture.

Leftovers of a prepare that died (``.<name>.tmp-*``, ``.<name>.old-*``) are
removed by the next holder of the lock.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


@contextmanager
def exclusive(target: str | os.PathLike, log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the lock of ``target`` (waiting for another holder, with a message); clean up dead prepares' leftovers."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path(target)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log(f"waiting for another prepare of {target} to finish (lock {lock.lock_file})")
        lock.acquire()
    try:
        for stale in (*target.parent.glob(f".{target.name}.tmp-*"), *target.parent.glob(f".{target.name}.old-*")):
            _remove(stale)
        yield
    finally:
        lock.release()


@contextmanager
def staging(target: str | os.PathLike) -> Iterator[Path]:
    """A new empty directory beside ``target``; removed on exit unless it was published."""
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(built: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Rename ``built`` to ``target`` (call under ``exclusive(target)``); an existing ``target`` is replaced."""
    built, target = Path(built), Path(target)
    old = None
    if target.exists() or target.is_symlink():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
    os.rename(built, target)
    if old is not None:
        _remove(old)
    return target


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a small file under a temporary name, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
