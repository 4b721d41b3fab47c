"""The study driver: one Tune experiment per cell (ASHA + Optuna + MLflow), then
Parquet export and the report. All Ray Tune calls of the driver live here.

Layout of a study run (``<storage>/<study>-<scale>/``)::

    tune/<cell>/...        Ray Tune experiments (restored when run again)
    mlflow.db              the default embedded MLflow store (sqlite)
    mlartifacts/           MLflow artifacts of that store
    trials.parquet         one row per trial
    curves.parquet         one row per report
    report/report.md, report/curves.png
    driver.lock            held by the running driver (studies/guard.py: one driver per study dir)
    tune/.abandoned/       trial dirs of a killed run that the resumed experiment does not own

Running the same command again resumes: finished cells are skipped, an
interrupted cell is restored with ``Tuner.restore`` (finished trials stay
finished, running ones continue from their last checkpoint), and MLflow runs
are reused, never duplicated.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from regtune.methods import resolve_config
from regtune.report import build_report
from regtune.results import curve_rows, read_tables, trial_row, write_tables
from regtune.tasks.base import get_task
from studies import guard
from studies.spec import Cell, Study, cell_configs, check_study, sample_point

DONE_FILE = "cell_done.json"


def study_dir(storage: str | os.PathLike, study: Study, scale: str) -> Path:
    guard.check_storage_value(storage)  # a directory (NFS/EFS on a cluster), not an s3:// URI
    return Path(storage).expanduser().resolve() / f"{study.name}-{scale}"


# --------------------------------------------------------------------------
# reading Tune's per-trial files (params.json, result.json) into tidy tables
def _read_reports(result_file: Path) -> list[dict[str, Any]]:
    by_step: dict[int, dict[str, Any]] = {}
    if result_file.exists():
        for line in result_file.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
            if "step" in r:
                by_step[int(r["step"])] = r  # a resumed trial may repeat steps: keep the last
    return [by_step[s] for s in sorted(by_step)]


def collect_cell(study: Study, scale: str, cell: Cell, exp_dir: Path, budget: int, searched: list[str]):
    task = get_task(cell.task)
    trials, curves = [], []
    for params_file in sorted(exp_dir.glob("*/params.json")):
        tdir = params_file.parent
        reports = _read_reports(tdir / "result.json")
        if not reports:
            continue
        trial_id = reports[-1].get("trial_id") or tdir.name
        config = {k: v for k, v in json.loads(params_file.read_text()).items() if not k.startswith("__")}
        pub = cell.published.get(task.metric.replace("val/", "test/")) or next(iter(cell.published.values()), None)
        meta = {
            "study": study.name, "scale": scale, "cell": cell.name, "cell_index": study.cells.index(cell),
            "task": cell.task, "method": cell.method,
            "trial_id": trial_id, "budget": budget, "metric": task.metric, "mode": task.mode,
            "row": cell.row, "col": cell.col, "searched": json.dumps(searched),
            "speedup_baseline": cell.speedup_baseline,
            "published/value": pub.value if pub else math.nan,
            "published/source": pub.source if pub else None,
            "published/metric": pub.metric if pub else None,
            "published/config": json.dumps(dict(cell.published_config)) if cell.published_config else None,
            "published/values": json.dumps({m: p.value for m, p in cell.published.items()}) if cell.published else None,
        }
        last_step = int(reports[-1]["step"])
        errored = any((tdir / f).exists() for f in ("error.txt", "error.pkl")) and last_step < budget \
            and not reports[-1].get("diverged")
        trials.append(trial_row(meta, config, reports, errored=errored, threshold=study.threshold))
        curves.extend(curve_rows(meta, reports))
    return trials, curves


def export(study: Study, scale: str, sdir: Path, plans: list[tuple[Cell, int, list[str]]]) -> tuple[Path, Path]:
    trials, curves = [], []
    for cell, budget, searched in plans:
        t, c = collect_cell(study, scale, cell, sdir / "tune" / cell.name, budget, searched)
        trials += t
        curves += c
    return write_tables(trials, curves, sdir)


def make_report(study: Study, scale: str, sdir: Path) -> list[Path]:
    trials, curves = read_tables(sdir)
    title = f"{study.name} ({scale} scale)"
    notes = f"{study.doc}\n\nPaper: {study.paper}" + (f"\n\n{study.notes}" if study.notes else "")
    return build_report(trials, curves, sdir / "report", title=title, notes=notes)


# --------------------------------------------------------------------------
def _init_ray(address: str | None, log: Callable[[str], None]) -> bool:
    """Connect to ``address`` (or $RAY_ADDRESS), else start local Ray; True when local Ray was started here."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log(f"connecting to Ray at {address}")
        ray.init(address=address, log_to_driver=True)
        return False
    log("starting local Ray")
    ray.init(include_dashboard=False, log_to_driver=True)
    return True


def cell_budget(cell: Cell, fixed: Mapping[str, Any], searched: Mapping[str, Any]) -> tuple[int, int]:
    """(steps, eval_every) of the cell's trials, as the resolved config gives them (size presets included)."""
    hparams = {k: v for k, v in fixed.items() if not k.startswith("__")}  # __extras: driver inputs
    resolved = resolve_config(cell.method, {**hparams, **sample_point(searched)[0]})
    return resolved["steps"], resolved["eval_every"]


def _trial_dirname(trial) -> str:
    return f"{trial.trainable_name}_{trial.trial_id}"


def _resources(study: Study, cell: Cell, scale: str) -> dict[str, float]:
    """The trial's request, fitted to the cluster: no GPU asked where there is none
    (the same study runs on a CPU laptop), never more CPUs than the cluster has."""
    import ray

    if study.resources is not None:
        res = dict(study.resources(cell.task, scale))
    else:
        res = dict(get_task(cell.task).resources)
    total = ray.cluster_resources()
    res["cpu"] = max(1, min(int(res.get("cpu", 1)), int(total.get("CPU", 1))))
    if not total.get("GPU"):
        res["gpu"] = 0
    return res


def run_cell(
    study: Study, scale: str, cell: Cell, index: int, sdir: Path, tracker, *,
    extra: Mapping[str, Any], num_samples: int, max_concurrent: int, seed: int, log: Callable[[str], None],
    overrides: Mapping[str, Any] | None = None,
) -> None:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    import trainables

    exp_dir = sdir / "tune" / cell.name
    if (exp_dir / DONE_FILE).exists():
        log(f"[{cell.name}] already finished, skipping")
        return
    sc = study.scales[scale]
    task = get_task(cell.task)
    fixed, searched = cell_configs(study, cell, scale, extra, overrides)
    fixed.setdefault("seed", seed)
    fixed["__extras"] = {"study_dir": str(sdir), "cell": cell.name, "needs": list(cell.needs)}
    budget, eval_every = cell_budget(cell, fixed, searched)
    trainable = tune.with_resources(trainables.get(cell.method), _resources(study, cell, scale))
    callbacks = [tracker.callback(cell.name, {"study": study.name, "scale": scale, "method": cell.method,
                                              "task": cell.task})]
    tuner = None
    if tune.Tuner.can_restore(str(exp_dir)):  # only ever the study's own experiment dir
        log(f"[{cell.name}] resuming the interrupted experiment in {exp_dir}")
        try:
            tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_errored=True)
        except Exception as e:  # noqa: BLE001 - e.g. killed before its first trial: start the cell again
            log(f"[{cell.name}] cannot restore ({type(e).__name__}: {e}); starting the cell again")
    if tuner is None:
        guard.start_fresh(exp_dir, num_samples, tracker, cell.name, log)
        grace = max(eval_every, int(round(budget * sc.grace_fraction / eval_every)) * eval_every)
        scheduler = ASHAScheduler(time_attr="step", max_t=budget, grace_period=min(grace, budget),
                                  reduction_factor=sc.reduction_factor)
        # a point keeps its searched keys (a key fixed at this scale or by --set is left out);
        # OptunaSearch needs every searched key in a point
        points = [q for q in ({k: v for k, v in p.items() if k in searched} for p in cell.points)
                  if q and set(q) == set(searched)]
        search = OptunaSearch(seed=seed + index, points_to_evaluate=points or None)
        tuner = tune.Tuner(
            trainable,
            param_space={**fixed, **{k: trainables.to_tune(v) for k, v in searched.items()}},
            tune_config=tune.TuneConfig(
                metric=task.metric, mode=task.mode, scheduler=scheduler, search_alg=search,
                num_samples=num_samples, max_concurrent_trials=max_concurrent,
                trial_dirname_creator=_trial_dirname, reuse_actors=True,  # no new process per trial
            ),
            run_config=tune.RunConfig(
                name=cell.name,
                storage_path=str(sdir / "tune"),
                callbacks=callbacks,
                failure_config=tune.FailureConfig(max_failures=sc.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                verbose=1,
            ),
        )
    log(f"[{cell.name}] {cell.task} x {cell.method}: {num_samples} trials, budget {budget} steps, "
        f"searching {', '.join(searched) or 'nothing'}")
    with guard.SignalWatch() as watch:  # Ctrl-C/SIGTERM: Tune saves its state and fit() returns early
        results = tuner.fit()
    names = guard.settle_cell(results, exp_dir, tracker, cell.name, log, interrupted=watch.hit)
    errors = [r.error for r in results if r.error is not None]
    (exp_dir / DONE_FILE).write_text(json.dumps({"trials": len(results), "errors": len(errors), "dirs": names}))


def run_study(
    study: Study,
    scale: str,
    *,
    storage: str,
    num_samples: int | None = None,
    max_concurrent: int | None = None,
    mlflow_uri: str | None = None,
    address: str | None = None,
    seed: int = 0,
    overrides: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Run (or resume) every cell of ``study`` at ``scale``; export Parquet; write the report."""
    from studies.tracking import StudyTracker, default_tracking_uri, ui_command

    check_study(study, scale, overrides)  # every key and range, before anything is started or written
    sc = study.scales[scale]
    sdir = study_dir(storage, study, scale)
    guard.check_data_dirs((c.name, cell_configs(study, c, scale, None, overrides)[0]) for c in study.cells)
    guard.check_storage(sdir)  # not writable: exit 2 before Ray starts
    lock = guard.DriverLock(sdir).acquire()  # one driver per study dir; the kernel frees it if this one dies
    lock.stop_leftovers(log)  # local Ray processes a SIGKILLed previous driver left behind
    extra = dict(study.prepare(sdir, scale)) if study.prepare else {}
    np.random.seed(seed)  # ASHA's bracket draws on the driver
    if _init_ray(address, log):
        lock.record(ray_session=guard.ray_session_dir())
    guard.sigterm_as_sigint()
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    n = num_samples or sc.num_samples
    conc = max_concurrent or sc.max_concurrent or max(1, cpus)
    uri = mlflow_uri or default_tracking_uri(sdir)
    tracker = StudyTracker(uri, f"regtune/{study.name}", sdir,
                           tags={"study": study.name, "scale": scale, "study_run": f"{study.name}-{scale}"})
    tracker.log_params({"scale": scale, "num_samples": n, "max_concurrent": conc, "seed": seed})
    plans = []
    try:
        for i, cell in enumerate(study.cells):
            fixed, searched = cell_configs(study, cell, scale, extra, overrides)
            plans.append((cell, cell_budget(cell, fixed, searched)[0], sorted(searched)))
            run_cell(study, scale, cell, i, sdir, tracker, extra=extra, num_samples=n,
                     max_concurrent=conc, seed=seed, log=log, overrides=overrides)
            export(study, scale, sdir, plans)
        paths = make_report(study, scale, sdir)
        tracker.log_artifacts([*paths, sdir / "trials.parquet", sdir / "curves.parquet"])
        tracker.finish("FINISHED")
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    finally:
        lock.release()
    log(f"\nstudy {study.name} ({scale}) done")
    log(f"  results:  {sdir / 'trials.parquet'}\n            {sdir / 'curves.parquet'}")
    log(f"  report:   {paths[0]}\n            {paths[1]}")
    log(f"  MLflow:   {uri}\n  dashboard: {ui_command(uri)}")
    return sdir

