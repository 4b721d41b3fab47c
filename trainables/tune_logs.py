"""Tune's per-trial logs (``result.json``, ``progress.csv``) that keep every row across a trial retry.

Tune's driver appends each trial's rows to a file in its staging directory and copies that directory to storage in
the background (an experiment-state sync: at most one at a time, launched every few seconds and after
checkpoints). When a trial's process dies and ``FailureConfig`` retries it in the same run, Tune's loggers first
copy the storage's file back over the staging one (``LoggerCallback._restore_from_remote``, written for a driver
restarted by ``Tuner.restore``, whose staging directory is new and empty; Ray 2.60). The storage copy is only as
new as the last finished sync, so rows the driver logged after it (such as the report whose checkpoint the retry
resumes from) are overwritten, and the next sync writes the shortened file to storage: the trial's curve has a
hole. Seen on a loaded machine: a trial retried from its step-75 checkpoint had no step-75 row in result.json.

These loggers restore from storage only when the staging file is missing (a new driver). A staging file that
exists was written by this driver, row by row and flushed, and every storage copy of it is an older snapshot.
Pass ``loggers()`` in ``RunConfig(callbacks=...)``: Tune then adds no JSON or CSV logger of its own.
"""

from __future__ import annotations

from pathlib import Path

from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback


class _KeepStagedRows:
    def _restore_from_remote(self, file_name: str, trial) -> None:
        if Path(trial.local_path, file_name).exists():  # this driver's own rows: the newest there are
            return
        super()._restore_from_remote(file_name, trial)  # a new driver (Tuner.restore): storage has them all


class ResultJsonLogger(_KeepStagedRows, JsonLoggerCallback):
    """Tune's ``result.json`` logger; a retried trial keeps the rows logged before it died."""


class ProgressCsvLogger(_KeepStagedRows, CSVLoggerCallback):
    """Tune's ``progress.csv`` logger; a retried trial keeps the rows logged before it died."""


def loggers() -> list:
    """The per-trial loggers for ``tune.RunConfig(callbacks=[..., *loggers()])``."""
    return [ResultJsonLogger(), ProgressCsvLogger()]
