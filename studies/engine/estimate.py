"""``python -m studies estimate NAME [--scale S] [--address ...]``: what a study will cost, before it starts.

Each cell is calibrated briefly on the hardware it will use: a few dozen training steps (after a few warm-up
steps) and one evaluation of the cell's published configuration, in this process (the local machine) or, with
``--address``, as a Ray task with the cell's per-trial resources on the cluster. A cell of several
data-parallel workers is calibrated as ONE worker computing its share of the global batch (collectives
skipped): compute only, communication and Ray Train's start-up not included. Nothing is trained beyond the
calibration and nothing is written to the study's directory.

From the calibration, per cell and in total:

* steps/s and the time of one full-budget trial (its steps plus its evaluations);
* the expected number of trials that reach the full budget under the cell's ASHA (``expected_asha``): Ray's
  asynchronous successive halving (``AsyncHyperBandScheduler``: rungs at grace x rf^k, a trial continues at
  a rung when its metric is at or above the (1 - 1/rf) quantile of the values recorded there before it),
  simulated for ``num_samples`` trials whose metrics are exchangeable (a random search) and which reach each
  rung one after another; the expected total steps follows from the same simulation. Optuna's later, better
  trials and many trials reaching a rung at once both let more trials through: read it as a lower bound;
* GPU-hours (CPU-hours where a trial has no GPU) and the wall time on the cluster's GPUs / CPUs: the work
  spread over the trial slots the cluster has (``--gpus`` / ``--cpus`` plan for a cluster that is not up
  yet), and never less than one full-budget trial.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from regtune.space import ConfigError
from studies.spec import Cell, Study, cell_configs, cell_points, check_study, sample_point

WARMUP_STEPS = 3
SIMULATIONS = 4000


# --------------------------------------------------------------------------- ASHA
def asha_rungs(budget: int, grace: int, rf: int, eval_every: int) -> list[int]:
    """The steps at which a trial is judged (Ray's milestones below the budget, at the first report on or after)."""
    rungs = int(np.log(budget / grace) / np.log(rf) + 1)
    out = []
    for k in range(rungs):
        milestone = grace * rf ** k
        step = int(math.ceil(milestone / eval_every) * eval_every)
        if step < budget:
            out.append(step)
    return sorted(set(out))


def expected_asha(num_samples: int, budget: int, grace: int, rf: int, eval_every: int = 1,
                  simulations: int = SIMULATIONS, seed: int = 0) -> tuple[float, float]:
    """(expected trials reaching ``budget``, expected total steps) of ``num_samples`` trials under ASHA."""
    rungs = asha_rungs(budget, grace, rf, eval_every)
    if not rungs:
        return float(num_samples), float(num_samples * budget)
    rng = np.random.default_rng(seed)
    q = (1 - 1 / rf) * 100
    full = steps = 0.0
    for _ in range(simulations):
        alive = list(range(num_samples))
        start = 0
        for rung in rungs:
            steps += len(alive) * (rung - start)
            start = rung
            recorded: list[float] = []
            survivors = []
            for trial in alive:  # arrival order: the order the trials reach the rung
                value = rng.random()
                if not recorded or value >= np.percentile(recorded, q):
                    survivors.append(trial)
                recorded.append(value)
            alive = survivors
        steps += len(alive) * (budget - start)
        full += len(alive)
    return full / simulations, steps / simulations


# --------------------------------------------------------------------------- calibration
class _ShareOnly:
    """A DataParallel stand-in for calibrating one worker of N: its share of the batch, no collectives."""

    def __new__(cls, world_size: int):
        from regtune.distributed import DataParallel

        class ShareOnly(DataParallel):
            def all_sum_(self, tensors):
                pass

            def sum_floats(self, values):
                return [float(v) for v in values]

            def broadcast_(self, tensors, src=0):
                pass

        return ShareOnly(0, world_size)


def calibrate(method: str, config: Mapping[str, Any], steps: int, threads: int) -> dict[str, float]:
    """Steps/s and seconds per evaluation of ``method`` with ``config``, measured here (a Ray task runs it too)."""
    import torch

    from regtune.loop import Run

    torch.set_num_threads(max(1, int(threads)))
    workers = int(config.get("workers", 1))
    dp = _ShareOnly(workers) if workers > 1 else None
    run = Run(method, dict(config), dp=dp) if dp is not None else Run(method, dict(config))
    run.train_steps(WARMUP_STEPS)
    t0 = time.perf_counter()
    run.train_steps(steps)
    sync(run.device)
    seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    run.evaluate()
    sync(run.device)
    return {"steps_per_s": steps / seconds, "eval_s": time.perf_counter() - t1, "device": str(run.device)}


def sync(device) -> None:
    import torch

    if getattr(device, "type", "") == "cuda":
        torch.cuda.synchronize()


@dataclass
class CellEstimate:
    cell: str
    method: str
    workers: int
    steps_per_s: float
    trial_s: float
    num_samples: int
    full_trials: float
    total_steps: float
    gpus: float
    cpus: float
    work_s: float
    device: str


def _cell_config(study: Study, cell: Cell, scale: str, extra: Mapping[str, Any], overrides) -> dict[str, Any]:
    fixed, searched = cell_configs(study, cell, scale, extra, overrides)
    point = next(iter(cell_points(cell, searched)), {})  # the recipe's first point, where it covers the space
    config = {**fixed, **sample_point(searched)[0], **point}
    return {k: v for k, v in config.items() if not k.startswith("__")}


def estimate_study(study: Study, scale: str, *, overrides: Mapping[str, Any] | None = None, steps: int = 30,
                   address: str | None = None, gpus: float | None = None, cpus: float | None = None,
                   num_samples: int | None = None, log: Callable[[str], None] = print) -> list[CellEstimate]:
    """Calibrate every cell and print the cost table; returns the per-cell estimates."""
    from regtune.methods import resolve_config
    from studies.engine import guard
    from studies.engine.driver import _resources

    check_study(study, scale, overrides)
    from studies.engine.preflight import check_data

    check_data(study, scale, overrides)  # every data set present, or one line each with its prepare command
    sc = study.scales[scale]
    n = num_samples or sc.num_samples
    from studies.engine.confirm import settings

    seeds, top = settings(study, scale, None, None)
    confirm_runs = seeds * top  # full-budget re-runs of each cell's top configs (no early stopping)
    log(f"[{study.name}] {n} search trials a cell under ASHA, then {confirm_runs} confirm run(s) a cell at full budget")
    with tempfile.TemporaryDirectory(prefix="regtune-estimate-") as tmp:
        extra = dict(study.prepare(Path(tmp), scale)) if study.prepare else {}  # smoke data only
        configs = {c.name: _cell_config(study, c, scale, extra, overrides) for c in study.cells}
        guard.check_data_dirs((name, cfg) for name, cfg in configs.items())
        cluster = _cluster(address, gpus, cpus)
        remote = _remote_calibrate(address) if address else None
        out = []
        for cell in study.cells:
            config = resolve_config(cell.method, configs[cell.name])
            res = _resources_for(study, cell, scale, _resources, cluster)
            try:
                if remote is not None:
                    import ray

                    cal = ray.get(remote.options(num_cpus=res["cpu"], num_gpus=res["gpu"]).remote(
                        cell.method, config, steps, res["cpu"]))
                else:
                    cal = calibrate(cell.method, config, steps, res["cpu"])
            except (FileNotFoundError, OSError) as e:
                raise ConfigError(f"cell {cell.name!r} of study {study.name!r} at scale {scale!r}: its data are "
                                  f"missing ({e}); prepare them (`python -m studies prepare --study {study.name} "
                                  f"--scale {scale}`), then estimate again") from e
            budget, every = config["steps"], config["eval_every"]
            grace = max(every, int(round(budget * sc.grace_fraction / every)) * every)
            full, total_steps = expected_asha(n, budget, min(grace, budget), sc.reduction_factor, every)
            full, total_steps = full + confirm_runs, total_steps + confirm_runs * budget  # + the confirm phase
            trial_s = budget / cal["steps_per_s"] + (budget // every) * cal["eval_s"]
            work_s = total_steps / cal["steps_per_s"] + total_steps / every * cal["eval_s"]
            workers = int(config.get("workers", 1))
            out.append(CellEstimate(cell.name, cell.method, workers, cal["steps_per_s"], trial_s, n, full,
                                    total_steps, workers * res["gpu"], workers * res["cpu"], work_s, cal["device"]))
            log(f"[{cell.name}] calibrated on {cal['device']}: {cal['steps_per_s']:.2f} steps/s"
                + (f" (one worker of {workers})" if workers > 1 else ""))
    print_table(study, scale, out, cluster, log)
    return out


def _resources_for(study, cell, scale, resources_fn, cluster) -> dict[str, float]:
    import ray

    if not ray.is_initialized():  # _resources caps by the cluster it reads from Ray: give it the planned one
        real = ray.cluster_resources
        ray.cluster_resources = lambda: {"CPU": cluster["CPU"], "GPU": cluster["GPU"]}
        try:
            res = dict(resources_fn(study, cell, scale))
        finally:
            ray.cluster_resources = real
    else:
        res = dict(resources_fn(study, cell, scale))
    if not cluster["GPU"]:
        res["gpu"] = 0
    return {"cpu": float(res.get("cpu", 1)), "gpu": float(res.get("gpu", 0))}


def _cluster(address: str | None, gpus: float | None, cpus: float | None) -> dict[str, float]:
    if address:
        import ray

        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=False)
        res = ray.cluster_resources()
        have = {"CPU": float(res.get("CPU", 0)), "GPU": float(res.get("GPU", 0))}
    else:
        import os

        import torch

        have = {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
    if gpus is not None:
        have["GPU"] = float(gpus)
    if cpus is not None:
        have["CPU"] = float(cpus)
    return have


def _remote_calibrate(address: str):
    import ray

    return ray.remote(calibrate)


def _hours(seconds: float) -> str:
    h = seconds / 3600
    return f"{h:,.2f}" if h < 100 else f"{h:,.0f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def print_table(study: Study, scale: str, cells: list[CellEstimate], cluster: Mapping[str, float],
                log: Callable[[str], None] = print) -> None:
    from studies.spec import stages

    sc = study.scales[scale]
    log(f"\nestimate: study {study.name} at scale {scale!r}; ASHA reduction factor {sc.reduction_factor}, grace "
        f"{sc.grace_fraction:.3g} of the budget; cluster {cluster['GPU']:g} GPUs / {cluster['CPU']:g} CPUs")
    head = ("cell", "workers", "steps/s", "full trial", "trials", "E[full]", "E[steps]", "GPU-h", "CPU-h", "wall")
    rows = []
    share = {}
    for c in cells:
        share[c.cell] = c.work_s / _slots(c, cluster, sc.max_concurrent)  # the cell's work over its trial slots
        rows.append((c.cell, str(c.workers), f"{c.steps_per_s:.2f}", _duration(c.trial_s), str(c.num_samples),
                     f"{c.full_trials:.2f}", f"{c.total_steps:,.0f}", _hours(c.work_s * c.gpus),
                     _hours(c.work_s * c.cpus), _duration(max(share[c.cell], c.trial_s))))
    by_name = {c.cell: c for c in cells}
    wall = 0.0
    for stage in stages(study):  # a stage's cells run side by side; stages one after another
        members = [by_name[c.name] for c in stage if c.name in by_name]
        if members:
            wall += max(sum(share[c.cell] for c in members), max(c.trial_s for c in members))
    rows.append(("total", "", "", "", str(sum(c.num_samples for c in cells)),
                 f"{sum(c.full_trials for c in cells):.2f}", f"{sum(c.total_steps for c in cells):,.0f}",
                 _hours(sum(c.work_s * c.gpus for c in cells)), _hours(sum(c.work_s * c.cpus for c in cells)),
                 _duration(wall)))
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    for r in (head, *rows):
        log("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
    log("full trial: one trial's steps and evaluations at the calibrated speed. E[full], E[steps]: expected trials "
        "reaching the budget and steps trained under ASHA (random-search model; Optuna's later trials do better, "
        "so more may finish). GPU-h / CPU-h: E[steps] at the calibrated speed x the trial's request. wall: the "
        "cell's work over the trial slots the cluster holds (total: a stage's cells side by side, stages one "
        "after another). Not included: Ray / Ray Train start-up, data preparation, communication between workers.")


def _slots(c: CellEstimate, cluster: Mapping[str, float], max_concurrent: int | None) -> int:
    if c.gpus > 0 and cluster["GPU"] > 0:
        slots = int(cluster["GPU"] // c.gpus)
    else:
        slots = int(cluster["CPU"] // max(c.cpus, 1e-9))
    slots = max(1, min(slots, c.num_samples))
    return min(slots, max_concurrent) if max_concurrent else slots


# --------------------------------------------------------------------------- command line
def add_parser(sub) -> None:
    """The ``estimate`` subcommand's arguments (``studies.__main__`` calls it)."""
    s = sub.add_parser("estimate", help="calibrate each cell briefly and print the study's cost (no training)")
    s.add_argument("study")
    s.add_argument("--scale", default=None, help="budget preset (default: the study's default scale)")
    s.add_argument("--address", default=None, help="calibrate on this Ray cluster (default: this machine)")
    s.add_argument("--gpus", type=float, default=None, help="plan the wall time for this many GPUs")
    s.add_argument("--cpus", type=float, default=None, help="plan the wall time for this many CPUs")
    s.add_argument("--steps", type=int, default=30, help="calibration steps per cell (after 3 warm-up steps)")
    s.add_argument("--num-samples", type=int, default=None, help="trials per cell (default: the scale's)")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a hyperparameter in every cell (repeatable; VALUE is JSON or a string)")


def main(args, study: Study, scale: str, overrides: Mapping[str, Any]) -> int:
    for name in ("steps", "num_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}={value!r} is not allowed: expected an integer >= 1")
    for name in ("gpus", "cpus"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise ConfigError(f"--{name}={value!r} is not allowed: expected a number >= 0")
    estimate_study(study, scale, overrides=overrides, steps=args.steps, address=args.address, gpus=args.gpus,
                   cpus=args.cpus, num_samples=args.num_samples)
    return 0
