"""Errors that fail a trial the same way on every attempt: not retried.

A configuration error (``regtune.space.ConfigError``: a value only the built
task or model can reject) or a data error (``regtune.data.DataMissing``: the
prepared files are not there) will fail a retry identically, so retrying only
burns GPU time and fills the log with the same traceback. Retries stay for
crashes: a killed process, OOM, a lost node.

Tune's ``FailureConfig(max_failures=k)`` retries every errored trial and
decides so inside its controller before any scheduler or callback hears of the
error. So the trial tells first: ``report`` sends one last result carrying
``PERMANENT_KEY`` (the error in one line), then the trial raises as usual. The
study's scheduler sees that result before the error arrives and drops the
trial's retries, and its searcher hands out no more trials of that cell
(``studies.engine.stage``). The trial ends in Tune's ERROR state with its real
traceback in ``error.txt``.

Only trials of a study (their config names a cell) report: a search of one's own
with a ``metric`` in its ``TuneConfig`` would reject a result without that
metric; there the error is raised and Tune's own retry rules apply.
"""

from __future__ import annotations

from regtune.data import DataMissing
from regtune.space import ConfigError

PERMANENT = (ConfigError, DataMissing)
PERMANENT_KEY = "permanent_error"


def is_permanent(error: BaseException) -> bool:
    return isinstance(error, PERMANENT)


def in_study(config) -> bool:
    """A trial the study driver started (``studies.engine.stage``: its config names its cell)."""
    return bool((config.get("__extras") or {}).get("cell"))


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}"


def report(error: BaseException) -> None:
    """Tell Tune (before raising ``error``) that the trial fails permanently."""
    from ray import tune

    tune.report({PERMANENT_KEY: one_line(error)})
