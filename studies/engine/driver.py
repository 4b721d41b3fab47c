"""The study driver: one Tune experiment per stage of cells (per-cell ASHA + Optuna,
MLflow; see ``studies.engine.stage``), then Parquet export and the report. All Ray Tune
calls of the driver live here.

Layout of a study run (``<storage>/<study>-<scale>/``)::

    tune/stage<k>/<cell>_<trial id>/   Ray Tune experiments (restored when run again)
    tune/stage_confirm/                the confirm phase: the best configs with fresh seeds (studies/engine/confirm.py)
    mlflow.db              the default embedded MLflow store (sqlite)
    mlartifacts/           MLflow artifacts of that store
    trials.parquet         one row per trial
    curves.parquet         one row per report
    report/report.md, report/curves.png, report/search_trace.png
    driver.lock            held by the running driver (studies/engine/guard.py: one driver per study dir)
    driver.lease           with s3:// storage: the lease in the bucket (studies/engine/s3lease.py)
    tune/.abandoned/       trial dirs of a killed run that the resumed experiment does not own

Running the same command again resumes: finished stages are skipped, an
interrupted stage is restored with ``Tuner.restore`` (finished trials stay
finished, running ones continue from their last checkpoint), and MLflow runs
are reused, never duplicated.

``--storage s3://bucket/prefix``: the same layout under the URI; the study dir here is then a local
mirror and ``studies.engine.storage`` moves files between the two (Tune writes to the bucket itself).
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from regtune.methods import resolve_config
from regtune.report import build_report
from regtune.results import curve_rows, read_jsonl, read_tables, trial_row, write_tables
from regtune.space import ConfigError
from regtune.tasks.base import get_task
from studies.engine import guard, preflight, provenance, scaleout
from studies.engine import storage as storage_io
from studies.engine.preflight_services import check_services
from studies.spec import Cell, Study, cell_configs, cell_points, check_study, sample_point, stages

DONE_FILE = "stage_done.json"


def study_dir(storage: str | os.PathLike, study: Study, scale: str) -> Path:
    guard.check_storage_value(storage)  # a directory (NFS/EFS on a cluster) or s3://bucket/prefix
    return storage_io.local_root(storage) / f"{study.name}-{scale}"  # s3://: its local mirror (studies.engine.storage)


# --------------------------------------------------------------------------
# reading Tune's per-trial files (params.json, result.json) into tidy tables
def _read_reports(result_file: Path) -> list[dict[str, Any]]:
    by_step: dict[int, dict[str, Any]] = {}
    for r in read_jsonl(result_file):  # the trial may still be writing its last line
        if "step" in r:
            by_step[int(r["step"])] = r  # a resumed trial may repeat steps: keep the last
    return [by_step[s] for s in sorted(by_step)]


def trial_dirs(sdir: Path) -> dict[str, list[tuple[Path, dict[str, Any]]]]:
    """cell name -> [(trial dir, its params.json)] over the study's stage experiments (set-aside dirs excluded)."""
    out: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
    for params_file in sorted((sdir / "tune").glob("stage*/*/params.json")):
        params = json.loads(params_file.read_text())
        cell = (params.get("__extras") or {}).get("cell")
        if cell:
            out.setdefault(cell, []).append((params_file.parent, params))
    return out


def collect_cell(study: Study, scale: str, cell: Cell, dirs: list[tuple[Path, dict[str, Any]]], budget: int,
                 searched: list[str]):
    task = get_task(cell.task)
    trials, curves = [], []
    for tdir, params in dirs:
        reports = _read_reports(tdir / "result.json")
        if not reports:
            continue
        trial_id = reports[-1].get("trial_id") or tdir.name
        config = {k: v for k, v in params.items() if not k.startswith("__")}
        extras = params.get("__extras") or {}
        pub = cell.published.get(task.metric.replace("val/", "test/")) or next(iter(cell.published.values()), None)
        meta = {
            "study": study.name, "scale": scale, "cell": cell.name, "cell_index": study.cells.index(cell),
            "task": cell.task, "method": cell.method,
            "trial_id": trial_id, "phase": extras.get("phase", "search"), "confirms": extras.get("confirms"),
            "started": float(reports[0].get("timestamp", math.nan)) - float(reports[0].get("time_total_s", 0.0)),
            "budget": budget, "metric": task.metric, "mode": task.mode,
            "row": cell.row, "col": cell.col, "group": cell.group, "searched": json.dumps(searched),
            "speedup_baseline": cell.speedup_baseline,
            "speedup_metric": cell.speedup_metric, "speedup_mode": cell.speedup_mode,
            "published/value": pub.value if pub else math.nan,
            "published/source": pub.source if pub else None,
            "published/metric": pub.metric if pub else None,
            "published/config": json.dumps(dict(cell.published_config)) if cell.published_config else None,
            "published/values": json.dumps({m: p.value for m, p in cell.published.items()}) if cell.published else None,
            "published/texts": json.dumps({m: p.text for m, p in cell.published.items()}) if cell.published else None,
            "published/stds": json.dumps({m: [p.std, p.n, p.std_text] for m, p in cell.published.items() if p.std is not None})
            if cell.published else None,
        }
        last_step = int(reports[-1]["step"])
        errored = any((tdir / f).exists() for f in ("error.txt", "error.pkl")) and last_step < budget \
            and not reports[-1].get("diverged")
        meta["data_source"] = provenance.cell_data_source(cell, config)
        trials.append(trial_row(meta, config, reports, errored=errored, threshold=study.threshold))
        curves.extend(curve_rows(meta, reports))
    return trials, curves


def export(study: Study, scale: str, sdir: Path, plans: list[tuple[Cell, int, list[str]]]) -> tuple[Path, Path]:
    trials, curves = [], []
    dirs = trial_dirs(sdir)
    for cell, budget, searched in plans:
        t, c = collect_cell(study, scale, cell, dirs.get(cell.name, []), budget, searched)
        trials += t
        curves += c
    paths = write_tables(trials, curves, sdir)
    storage_io.push(*paths)  # s3:// storage: into the bucket
    return paths


def make_report(study: Study, scale: str, sdir: Path) -> list[Path]:
    storage_io.pull(sdir / "trials.parquet", sdir / "curves.parquet")  # s3:// storage: from the bucket
    trials, curves = read_tables(sdir)
    title = f"{study.name} ({scale} scale)"
    notes = f"{study.doc}\n\nPaper: {study.paper}" + (f"\n\n{study.notes}" if study.notes else "")
    from studies.engine.rungs import rung_note

    notes += "\n\n" + rung_note(study, scale)  # which rung metric and grace the search's ASHA used
    paths = build_report(trials, curves, sdir / "report", title=title, notes=notes)
    storage_io.push(*paths)
    return paths


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


def _in_background(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Run ``fn`` in a thread; returns a function that waits for it and returns its value (or raises).
    (Ray must start in the main thread: its processes die with the thread that started them.)"""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            outcome["error"] = e

    thread = threading.Thread(target=target, name="regtune-setup", daemon=True)
    thread.start()

    def wait() -> Any:
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    return wait


def cell_budget(cell: Cell, fixed: Mapping[str, Any], searched: Mapping[str, Any]) -> tuple[int, int]:
    """(steps, eval_every) of the cell's trials, as the resolved config gives them (size presets included)."""
    hparams = {k: v for k, v in fixed.items() if not k.startswith("__")}  # __extras: driver inputs
    resolved = resolve_config(cell.method, {**hparams, **sample_point(searched)[0]})
    return resolved["steps"], resolved["eval_every"]


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


def _cluster() -> dict[str, float]:
    import ray

    return dict(ray.cluster_resources())


def cell_plan(study: Study, scale: str, cell: Cell, sdir: Path, *, extra: Mapping[str, Any],
              num_samples: int, seed: int, overrides: Mapping[str, Any] | None = None):
    """The cell's part of its stage's experiment: fixed config, Tune domains, points, metric, ASHA budget."""
    import trainables
    from studies.engine.stage import CellPlan

    sc = study.scales[scale]
    task = get_task(cell.task)
    fixed, searched = cell_configs(study, cell, scale, extra, overrides)
    fixed.setdefault("seed", seed)
    fixed["__extras"] = {"study_dir": storage_io.location(sdir), "cell": cell.name, "needs": list(cell.needs)}
    fixed[trainables.METHOD_KEY] = cell.method
    budget, eval_every = cell_budget(cell, fixed, searched)
    resources, workers = scaleout.trial_request(_resources(study, cell, scale), int(fixed.get("workers", 1)),
                                                _cluster())
    if workers is not None and storage_io.find(sdir):  # train_dp's Ray Train run expects a directory
        raise ConfigError(f"--set workers={fixed.get('workers')} (cell {cell.name!r}) is not allowed with s3:// storage: "
                          "data-parallel trials need a directory (a shared mount on a cluster)")
    if workers is not None:  # a Ray Train job per trial (trainables.train_dp): the workers' resources
        fixed["__workers"] = workers
    from studies.engine.rungs import grace_steps

    grace = grace_steps(budget, sc.grace_fraction, eval_every)
    points = cell_points(cell, searched)  # the recipe's searched keys first
    return CellPlan(
        name=cell.name, fixed=fixed, searched={k: trainables.to_tune(v) for k, v in searched.items()},
        points=points, metric=task.metric, mode=task.mode, seed=seed + study.cells.index(cell),
        num_samples=num_samples, budget=budget, grace=min(grace, budget), reduction_factor=sc.reduction_factor,
        resources=resources,
    )


def _trial_dirname(trial) -> str:
    from studies.engine.stage import cell_of

    return f"{cell_of(trial.config)}_{trial.trial_id}"


def run_stage(
    study: Study, scale: str, name: str, cells: list[Cell], plans: list, sdir: Path, tracker, *,
    num_samples: int, max_concurrent: int, log: Callable[[str], None], phase: str = "search",
) -> None:
    """Run (or resume) the cells of one stage (``plans``: theirs, from ``cell_plan``) as one Tune experiment
    in ``tune/<name>``. ``phase="confirm"``: ``plans`` are ``studies.engine.confirm.ConfirmPlan``s (fixed configs, no
    early stopping)."""
    # a snapshot per checkpoint is what makes a killed driver resumable (num_to_keep): not worth a warning
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    from ray import tune

    import trainables
    from studies.engine.stage import CellScheduler, CellSearch, cell_of, stop_line, stopped_cells, unstarted
    from trainables import ray_internals

    ray_internals.safe_checkpoint_retention()  # a killed driver leaves state naming only checkpoints on storage
    exp_dir = sdir / "tune" / name
    if (exp_dir / DONE_FILE).exists():
        log(f"[{name}] already finished, skipping ({', '.join(c.name for c in cells)})")
        return
    table = {p.name: p.resources for p in plans}

    def resources(config: dict):  # each cell's request (cells of a stage may differ)
        r = table[cell_of(config)]
        return tune.PlacementGroupFactory([{"CPU": r["cpu"], "GPU": r.get("gpu", 0)}])

    trainable = tune.with_resources(trainables.by_config(study.name), resources)
    callbacks = [tracker.callback(name, {"study": study.name, "scale": scale, "phase": phase}),
                 *ray_internals.loggers()]  # a retried trial keeps every row of its result.json
    total = sum(p.num_samples for p in plans)
    if phase == "confirm":
        from studies.engine.confirm import algorithms

        search_alg, scheduler = algorithms(plans)
    else:
        search_alg, scheduler = CellSearch(plans), CellScheduler(plans, log)
    tuner = None
    where = storage_io.location(exp_dir)  # s3:// storage: Tune reads and writes the bucket itself
    if tune.Tuner.can_restore(where):  # only ever the study's own experiment dir
        log(f"[{name}] resuming the interrupted experiment in {where}")
        try:
            tuner = tune.Tuner.restore(where, trainable=trainable, resume_errored=True)
        except Exception as e:  # noqa: BLE001 - e.g. killed before its first trial: start the stage again
            log(f"[{name}] cannot restore ({type(e).__name__}: {e}); starting the stage again")
    if tuner is None:
        guard.start_fresh(exp_dir, total, tracker, name, log)
        tuner = tune.Tuner(
            trainable,
            param_space={},  # every config comes from CellSearch: the cell's fixed values + its searcher's
            tune_config=tune.TuneConfig(
                scheduler=scheduler, search_alg=search_alg,
                num_samples=total, max_concurrent_trials=max_concurrent,
                trial_dirname_creator=_trial_dirname,
                # no new process per trial; but not for Ray Train trials (train_dp): their fit() can outlive the
                # last report by Tune's 2 s reset window, which then fails the next trial
                reuse_actors=not any(p.fixed.get("__workers") for p in plans),
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage_io.location(sdir / "tune"),
                callbacks=callbacks,
                failure_config=tune.FailureConfig(max_failures=study.scales[scale].max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                verbose=1,
            ),
        )
    for cell, p in zip(cells, plans if phase == "search" else []):
        log(f"[{cell.name}] {cell.task} x {cell.method}: {num_samples} trials, budget {p.budget} steps, "
            f"searching {', '.join(p.searched) or 'nothing'}")
    log(f"[{name}] {len(cells)} cells, {total} trials in one Tune experiment, up to {max_concurrent} at a time")
    with guard.SignalWatch() as watch:  # Ctrl-C/SIGTERM: Tune saves its state and fit() returns early
        results = tuner.fit()
    storage_io.pull(exp_dir)  # s3:// storage: the trial dirs Tune wrote, into the mirror
    stopped = stopped_cells(results)  # cells a configuration or data error stopped (not retried)
    for cell, (trial_id, error) in stopped.items():
        log(stop_line(cell, trial_id, error))
    names = guard.settle_stage(results, exp_dir, tracker, name, log, interrupted=watch.hit,
                               unstarted=unstarted(results, stopped, num_samples))
    errors = [r.error for r in results if r.error is not None]
    (exp_dir / DONE_FILE).write_text(json.dumps({"trials": len(results), "errors": len(errors), "dirs": names,
                                                 "stopped": {c: e for c, (_, e) in stopped.items()}}))
    storage_io.push(exp_dir / DONE_FILE)


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
    confirm_seeds: int | None = None,
    confirm_top: int | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Run (or resume) every cell of ``study`` at ``scale``, then its confirm phase (``studies.engine.confirm``;
    ``confirm_seeds`` 0: none); export Parquet; write the report."""
    from studies.engine import confirm

    check_study(study, scale, overrides)  # every key and range, before anything is started or written
    check_services(mlflow_uri, address)  # an unreachable MLflow server or Ray cluster: exit 2 within seconds
    sc = study.scales[scale]
    sdir = study_dir(storage, study, scale)
    guard.check_data_dirs((c.name, cell_configs(study, c, scale, None, overrides)[0]) for c in study.cells)
    preflight.check_data(study, scale, overrides)  # every data set present and complete, or exit 2 (one line each)
    provenance.check_paper_data(study, scale, overrides)  # paper scale: no generated or too-small data
    from studies.engine.tracking import StudyTracker, default_tracking_uri, ui_command  # MLflow: seconds to import
    guard.check_storage(sdir)  # not writable: exit 2 before Ray starts
    storage_io.check(sdir)  # s3://: the endpoint, the bucket and a probe write, or exit 2 (before Ray starts)
    lock = guard.DriverLock(sdir).acquire()  # one driver per study dir; the kernel frees it if this one dies
    storage_io.pull(sdir)  # s3://: the study's state in the bucket (stage markers, trial dirs) into the mirror
    lock.stop_leftovers(log)  # local Ray processes a SIGKILLed previous driver left behind
    extra = dict(study.prepare(sdir, scale)) if study.prepare else {}
    np.random.seed(seed)  # ASHA's bracket draws on the driver
    uri = mlflow_uri or default_tracking_uri(sdir)

    def setup_tracking() -> StudyTracker:  # while Ray starts: the MLflow store, Tune's and Optuna's imports
        import ray.tune.search.optuna  # noqa: F401

        return StudyTracker(uri, f"regtune/{study.name}", sdir,
                            tags={"study": study.name, "scale": scale, "study_run": f"{study.name}-{scale}"})

    tracker_ready = _in_background(setup_tracking)
    local_ray = _init_ray(address, log)
    if local_ray:
        lock.record(ray_session=guard.ray_session_dir())
    tracker = tracker_ready()
    guard.sigterm_as_sigint()
    n = num_samples or sc.num_samples
    conc = max_concurrent or sc.max_concurrent or scaleout.default_concurrency(  # trials x workers fit
        scaleout.study_footprints(study, scale, overrides, _resources, _cluster()), _cluster())
    n_seeds, n_top = confirm.settings(study, scale, confirm_seeds, confirm_top)
    tracker.log_params({"scale": scale, "num_samples": n, "max_concurrent": conc, "seed": seed,
                        "confirm_seeds": n_seeds, "confirm_top": n_top})
    plans, search_plans = [], []
    ray_stopped = None
    try:
        groups = stages(study)
        for k, cells in enumerate(groups, start=1):
            cell_plans = [cell_plan(study, scale, c, sdir, extra=extra, num_samples=n, seed=seed,
                                    overrides=overrides) for c in cells]
            plans += [(c, p.budget, sorted(p.searched)) for c, p in zip(cells, cell_plans)]
            search_plans += cell_plans
            run_stage(study, scale, f"stage{k}", cells, cell_plans, sdir, tracker, num_samples=n,
                      max_concurrent=conc, log=log)
            export(study, scale, sdir, plans)  # later stages read these results (external grafting)
        if n_seeds > 0:
            confirm.run_confirm(study, scale, sdir, tracker, search_plans, plans, seeds=n_seeds, top=n_top,
                                max_concurrent=conc, log=log)
        if local_ray:  # Tune is done with Ray: the local Ray stops while the report is written
            import ray

            ray_stopped = _in_background(ray.shutdown)
        paths = make_report(study, scale, sdir)
        tracker.sync(sdir)  # runs MLflow missed while its server was away: backfilled from the Parquet tables
        tracker.log_artifacts([*paths, sdir / "trials.parquet", sdir / "curves.parquet"])
        tracker.finish("FINISHED")
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    finally:
        if ray_stopped is not None:
            ray_stopped()
        lock.release()
    log(f"\nstudy {study.name} ({scale}) done")
    log(f"  results:  {storage_io.location(sdir / 'trials.parquet')}")
    log(f"            {storage_io.location(sdir / 'curves.parquet')}")
    log(f"  report:   {storage_io.location(paths[0])}\n"
        + "".join(f"            {storage_io.location(p)}\n" for p in paths[1:]).rstrip("\n"))
    log(f"  MLflow:   {uri}\n  dashboard: {ui_command(uri, tracker.experiment_id)}")
    return sdir

