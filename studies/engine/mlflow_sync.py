"""Backfill a study's MLflow runs from its Parquet tables (``studies sync-mlflow NAME``, and the end of every
``studies run``).

When the tracking server was away during a study (``studies.engine.tracking.MLflowLink``), trials ran without MLflow
runs, or with runs that stopped mid-way. ``backfill`` makes MLflow agree with ``trials.parquet`` and
``curves.parquet``: a trial with no run under the study's parent run (looked up by its ``trial_id`` tag, so a
second sync adds nothing) gets one, with its config as params, every curve metric at its step, the tags
``trial_id``, ``cell``, ``method``, ``task``, ``stage`` and ``regtune.backfilled``, and its final status; a run
left RUNNING gets the metric steps it missed and its final status. Runs already finished are left alone.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from regtune.results import KEY_COLUMNS, read_tables

BATCH_METRICS = 1000  # MLflow's per-request limits
BATCH_PARAMS = 100


def _stages(sdir: Path) -> dict[str, str]:
    """trial_id -> its stage experiment (``tune/stage<k>``), from the trial dirs' params.json."""
    from studies.engine.guard import _trial_id

    out = {}
    for params_file in (sdir / "tune").glob("stage*/*/params.json"):
        out[_trial_id(params_file.parent)] = params_file.parent.parent.name
    return out


def _value(v: Any) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if hasattr(v, "item"):  # numpy scalars
        v = v.item()
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
        return int(v)  # parquet turns an int column with gaps into floats; the live run logged "300", not "300.0"
    return v


def _metric_points(curve) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)] of one trial's curve rows."""
    points: dict[str, list[tuple[int, float]]] = {}
    keys = [c for c in curve.columns if c not in KEY_COLUMNS and c != "step"]
    for r in curve.to_dict("records"):
        step = int(r["step"])
        for k in keys:
            v = r.get(k)
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                points.setdefault(k, []).append((step, float(v)))
    return points


def backfill(tracker, sdir: Path) -> tuple[int, int]:
    """(runs created, runs completed) under ``tracker``'s parent run from the study's Parquet tables."""
    from mlflow.entities import Metric, Param

    trials, curves = read_tables(sdir)
    if trials.empty:
        return 0, 0
    client = tracker.client
    existing = {r.data.tags.get("trial_id"): r for r in tracker.runs()}
    stages = _stages(sdir)
    by_trial = dict(tuple(curves.groupby("trial_id"))) if not curves.empty else {}
    created = completed = 0
    for row in trials.to_dict("records"):
        tid = str(row["trial_id"])
        run = existing.get(tid)
        status = "FAILED" if row.get("status") == "error" else "FINISHED"
        if run is not None and run.info.status in ("FINISHED", "FAILED", "KILLED"):
            continue
        curve = by_trial.get(tid)
        points = _metric_points(curve.loc[:, curve.notna().any()]) if curve is not None else {}
        now = int(time.time() * 1000)
        params = [Param(k[len("config/"):], str(_value(v) if not isinstance(v, str) else v))
                  for k, v in row.items() if k.startswith("config/") and _value(v) is not None]
        if run is None:
            tags = {
                "mlflow.parentRunId": tracker.parent_id, "trial_id": tid, "regtune.backfilled": "true",
                **{k: str(row[k]) for k in ("cell", "method", "task", "phase") if row.get(k) is not None},
                **{k: v for k, v in tracker.tags.items() if k in ("study", "scale")},
            }
            if tid in stages:
                tags["stage"] = stages[tid]
            run_id = client.create_run(tracker.experiment_id, run_name=f"{row.get('cell')}_{tid}", tags=tags).info.run_id
            have: dict[str, set[int]] = {}
            created += 1
        else:  # a run the server lost mid-trial: its missing params (it may have died before they were logged)
            run_id = run.info.run_id
            params = [p for p in params if p.key not in run.data.params]
            have = {k: {m.step for m in client.get_metric_history(run_id, k)} for k in points}
            completed += 1
        for i in range(0, len(params), BATCH_PARAMS):
            client.log_batch(run_id, params=params[i:i + BATCH_PARAMS], synchronous=True)
        metrics = [Metric(k, v, now, step) for k, pts in points.items() for step, v in pts
                   if step not in have.get(k, set())]
        for i in range(0, len(metrics), BATCH_METRICS):
            client.log_batch(run_id, metrics=metrics[i:i + BATCH_METRICS], synchronous=True)
        client.set_terminated(run_id, status=status)
    return created, completed


def sync_main(study_name: str, scale: str | None, storage: str, mlflow_uri: str | None,
              log=print) -> int:
    """``studies sync-mlflow``: backfill one study run's MLflow runs; the study's parent run is reused."""
    from studies import get_study
    from studies.engine.driver import study_dir
    from studies.engine.guard import DriverLock
    from studies.engine.preflight_services import check_mlflow
    from studies.engine.storage import pull
    from studies.engine.tracking import PARENT_FILE, StudyTracker, default_tracking_uri, experiment_url
    from studies.spec import at_scale

    study = get_study(study_name)
    scale = scale or study.default_scale
    study = at_scale(study, scale)
    sdir = study_dir(storage, study, scale)
    pull(sdir)  # s3:// storage: the tables and trial dirs in the bucket, into the local mirror (studies.engine.storage)
    read_tables(sdir)  # no results yet: one line, exit 2
    check_mlflow(mlflow_uri)
    uri = mlflow_uri or default_tracking_uri(sdir)
    lock = DriverLock(sdir).acquire()  # not while a driver of this study runs (it syncs itself at its end)
    try:
        known = json.loads((sdir / PARENT_FILE).read_text()) if (sdir / PARENT_FILE).exists() else {}
        tracker = StudyTracker(uri, f"regtune/{study.name}", sdir, log=log, reopen=False,
                               tags={"study": study.name, "scale": scale, "study_run": f"{study.name}-{scale}"})
        created, completed = backfill(tracker, sdir)
        if uri not in known:  # a new parent in this store: it holds a finished study
            tracker.finish("FINISHED")
    finally:
        lock.release()
    log(f"MLflow {uri}: {created} trial runs backfilled, {completed} completed, "
        f"experiment {experiment_url(uri, tracker.experiment_id) if uri.startswith('http') else tracker.experiment_id}")
    return 0
