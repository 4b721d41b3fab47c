"""Inputs a trial reads from earlier cells of its study: external grafting's reference gradient norms.

Novack et al., "Disentangling the Mechanisms Behind Implicit Regularization in
SGD", ICLR 2023, https://arxiv.org/abs/2211.15853 (METHODS.md section 2):
``exter_graft`` takes its step norm from a reference small-batch ``sgd`` run,
the norm that run logged at the same step, held over 20-step blocks. The seed
code read it from a file downloaded by hand from wandb; here the reference is
an earlier cell of the same study, read from the study's stored results
(``trials.parquet`` + ``curves.parquet``, which the driver exports after every
cell; schema in ``regtune.results``).

The reference run is the reference cell's best completed trial (status
``completed``: it ran its whole budget), best by the final value of the cell's
metric (``metric`` / ``mode`` columns). Its ``grad/full_norm`` curve (one value
a report, the mean over the ``eval_every`` steps since the previous report) is
turned into ``{interval start step: norm}`` by
``regtune.microbatch.reference_norms_from_reports``, the mapping the step
expects in ``ctx.extras["reference_grad_norms"]``: with ``sgd`` reporting
every 20 steps (the task default), each entry is one 20-step block's mean.

Torch-free apart from the registry lookup; reads Parquet with pandas.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from regtune.microbatch import REFERENCE_KEY, reference_norms_from_reports
from regtune.results import CURVES_FILE, TRIALS_FILE

REFERENCE_METRIC = "grad/full_norm"


class ReferenceMissing(FileNotFoundError):
    """The study's stored results lack the reference cell (or a usable trial of it)."""


def best_completed_trial(trials: pd.DataFrame, cell: str) -> pd.Series | None:
    """The best search trial of ``cell`` among those that ran their whole budget (None if there is none)."""
    rows = trials[(trials["cell"] == cell) & (trials["status"] == "completed")]
    if "phase" in rows:  # the search's trials (confirm runs re-run the best one with other seeds)
        rows = rows[rows["phase"] == "search"]
    if rows.empty:
        return None
    metric, mode = rows["metric"].iloc[0], rows["mode"].iloc[0]
    col = f"final/{metric}"
    values = rows[col] if col in rows else pd.Series(math.nan, index=rows.index)
    values = values.astype(float).fillna(-math.inf if mode == "max" else math.inf)
    return rows.loc[values.idxmax() if mode == "max" else values.idxmin()]


def load_reference_norms(study_dir: str | Path, cell: str, metric: str = REFERENCE_METRIC) -> dict[int, float]:
    """``{interval start step: norm}`` of the best completed trial of ``cell`` stored in ``study_dir``.

    Raises ``ReferenceMissing`` naming the cell and the study dir when the
    tables, the cell, a completed trial of it, or its ``metric`` curve are missing.
    """
    read, missing = _tables(study_dir)
    where = f"reference cell {cell!r} in study dir {str(study_dir)!r}"
    if missing:
        raise ReferenceMissing(f"no stored results for {where}: missing {', '.join(missing)}"
                               " (the reference cell must run, and be exported, before this one)")
    trials = read(TRIALS_FILE)
    if "cell" not in trials or cell not in set(trials["cell"]):
        known = sorted(set(trials["cell"])) if "cell" in trials else []
        raise ReferenceMissing(f"no trials of {where} in {TRIALS_FILE} (cells there: {', '.join(known) or 'none'})")
    best = best_completed_trial(trials, cell)
    if best is None:
        raise ReferenceMissing(f"no completed trial of {where}: every trial stopped early, diverged or errored")
    curves = read(CURVES_FILE)
    rows = curves[(curves["cell"] == cell) & (curves["trial_id"] == best["trial_id"])]
    if metric not in rows or rows[metric].isna().all():
        raise ReferenceMissing(f"trial {best['trial_id']} of {where} has no {metric!r} curve in {CURVES_FILE}")
    reports = [{"step": int(r["step"]), metric: float(r[metric])} for _, r in rows.iterrows()
               if r[metric] is not None and not pd.isna(r[metric])]
    norms = reference_norms_from_reports(reports, metric)
    if 0 not in norms:  # reports keyed by interval start: the first report must have the metric
        raise ReferenceMissing(f"trial {best['trial_id']} of {where}: its first report has no {metric!r}")
    return norms


def _tables(study_dir: str | Path) -> tuple[Callable[[str], pd.DataFrame], list[str]]:
    """(read a table by file name, the missing table files) of a study dir or an ``s3://`` study URI (pyarrow's
    filesystem layer; the trial's process sees the driver's AWS environment)."""
    text = str(study_dir)
    if "://" not in text:
        sdir = Path(study_dir)
        return (lambda name: pd.read_parquet(sdir / name)), [n for n in (TRIALS_FILE, CURVES_FILE)
                                                             if not (sdir / n).exists()]
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(text)
    found = fs.get_file_info([f"{root}/{n}" for n in (TRIALS_FILE, CURVES_FILE)])
    missing = [n for n, i in zip((TRIALS_FILE, CURVES_FILE), found) if i.type != pafs.FileType.File]
    return (lambda name: pd.read_parquet(f"{root}/{name}", filesystem=fs)), missing


def needs_reference(method: str) -> bool:
    """Whether ``method``'s step reads ``ctx.extras[REFERENCE_KEY]`` (external grafting, in any composition)."""
    from regtune.methods import get_method

    return REFERENCE_KEY in get_method(method).reads


def step_inputs(method: str, extras: Mapping[str, Any]) -> dict[str, Any]:
    """The ``ctx.extras`` entries ``method`` reads from earlier cells, given the driver's ``__extras``
    (``study_dir`` and ``needs``, the names of the earlier cells). Empty for methods that read none,
    or when the reference is already given."""
    if not needs_reference(method) or REFERENCE_KEY in extras:
        return {}
    needs = list(extras.get("needs") or [])
    if not needs or not extras.get("study_dir"):
        raise ValueError(
            f"{method} needs a reference small-batch sgd run: give the cell `needs=(<sgd cell>,)` in its study, "
            f"or pass {REFERENCE_KEY!r} ({{step: norm}}) in the config's __extras")
    return {REFERENCE_KEY: load_reference_norms(extras["study_dir"], needs[0])}
