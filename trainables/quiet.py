"""Keep Ray's per-checkpoint chatter and library deprecation warnings out of a study's output.

Trial processes print through Ray to the driver's terminal: a line per checkpoint from Ray's storage layer
("Checkpoint successfully created at: ...", Ray's own INFO log) and deprecation warnings that Ray and torch
raise about their own internals tell the user of a study nothing they can act on. Errors and warnings of
regtune itself, and Ray's warnings and errors, still show.
"""

from __future__ import annotations

import logging
import warnings

RAY_CHATTY = ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage")


def quiet_trial_process() -> None:
    for name in RAY_CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(ray|torch|torchvision)(\.|$)")


def sigterm_outside_finalizers() -> bool:
    """In a Ray worker process: Ray's SIGTERM handling, but never inside a finalizer.

    Ray's workers turn SIGTERM into ``sys.exit(1)`` and then exit gracefully. When the signal arrives while the
    worker runs a finalizer (a ``__del__`` of a tensor, a temporary checkpoint directory, an object ref), the
    ``SystemExit`` cannot propagate: Python prints ``Exception ignored in: ... SystemExit: 1`` with a traceback
    and the process lives on until it is killed. This handler hands the signal to Ray's handler when no
    ``__del__`` is on the stack, and otherwise sends it again 50 ms later. Finalizers that are not a ``__del__``
    (a weakref callback, e.g. ``WeakSet._remove``) are caught where Python reports them: the unraisable hook
    swallows a ``SystemExit`` of this SIGTERM and sends the signal again 50 ms later. Returns whether it was
    installed (only in a Ray worker's main thread)."""
    import os
    import signal
    import sys
    import threading

    try:
        import ray
    except ImportError:
        return False
    # a Ray worker process, not a driver (such as the study's), as Ray's own RuntimeContext.get_actor_id tells
    # them apart; is_initialized first: get_runtime_context would start or join a Ray (ray.init) if none is
    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE \
            or threading.current_thread() is not threading.main_thread():
        return False
    ray_handler = signal.getsignal(signal.SIGTERM)
    if not callable(ray_handler) or getattr(ray_handler, "_regtune", False):
        return False

    delivered = {"sigterm": False}
    previous_hook = sys.unraisablehook

    def again() -> None:
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM)).start()

    def handler(signum, frame) -> None:
        f = frame
        while f is not None:  # in a __del__, or in our unraisable hook (its timer's start can outlast 50 ms)
            if f.f_code.co_name == "__del__" or f.f_code is unraisable.__code__:
                again()
                return
            f = f.f_back
        delivered["sigterm"] = True
        ray_handler(signum, frame)

    def unraisable(info) -> None:  # the SystemExit landed in a finalizer after all: exit a moment later
        if delivered["sigterm"] and isinstance(info.exc_value, SystemExit):
            again()
            return
        previous_hook(info)

    handler._regtune = True
    signal.signal(signal.SIGTERM, handler)
    sys.unraisablehook = unraisable
    return True
