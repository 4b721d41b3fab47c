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
