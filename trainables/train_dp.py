"""A trial of several data-parallel workers: a Tune function trainable that runs a Ray Train job.

``workers`` = N > 1 in a trial's config (``--set workers=N`` or a study scale's
``fixed``) makes ``trainables.run_trial`` call ``run_trial_dp``: it builds a
``TorchTrainer`` of N workers (gloo on CPU, NCCL with one GPU each where the
trial asks for GPUs) and calls ``fit()`` inside the Tune trial (Ray 2.60, Train
V2: ``Tuner(TorchTrainer)`` is not supported). Each worker runs
``regtune.loop.Run`` with ``DataParallel.from_torch()``: it builds the same
global batch for (seed, step), steps on its share and all-reduces where the
step's gradient is complete (``regtune.distributed``; no DDP wrapper, which
breaks the penalties' double backward).

Reporting: every worker calls ``ray.train.report`` at each report step; rank 0
carries the metrics (only it evaluates) and the checkpoint (rank 0's state
restores every worker), and ``TuneReportCallback`` forwards rank 0's metrics to
Tune, so ASHA, Optuna and MLflow see an ordinary trial.

Resume: the Train run is named after the Tune trial id and stored in the trial's
directory, so a retried trial (``FailureConfig``) or a restored experiment
(``Tuner.restore`` after the driver was killed) builds a Train run of the same
name, which starts from that run's latest checkpoint (``ray.train.get_checkpoint``
in every worker). Train itself does not retry (``max_failures=0``): a worker
that dies fails the trial, and Tune's retry resumes it.

Resources: the Tune trial itself asks for ~0 CPU (the driver's ``_resources``);
the workers' placement group asks for ``__workers`` = {"num", "cpu", "gpu"} per
worker, outside Tune's accounting, so the driver bounds the number of
concurrent trials to what the cluster can place (``studies.engine.scaleout``).

Stopped trials: Tune stops a trial as soon as ASHA says so (at every trial's
last report, at ``max_t``, too), which kills the trial's Train controller before
it has removed its workers' placement group; Ray keeps such a group until the
driver's job ends, and the next trial's workers would never fit. Each trial
releases the groups (and Ray Train's orphaned ``PlacementGroupCleaner`` actors)
that stopped trials of its job left behind, before and while its own Train run
starts and runs (``trainables.ray_internals``). Stages with multi-worker trials do
not reuse trial processes (``studies.engine.driver.run_stage``).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from ray import tune

WORKERS_KEY = "__workers"  # {"num": N, "cpu": c, "gpu": g} per worker, set by the study driver
TIMEOUT_S = int(os.environ.get("REGTUNE_DP_TIMEOUT_S", "600"))  # a hung collective fails after this long
CONTROLLER_FAILURES = 3  # worker-group start-up failures (60 s each) before the trial fails


def worker_spec(config: Mapping[str, Any]) -> dict[str, float]:
    """{"num", "cpu", "gpu"} of the trial's workers (the driver's request, else 1 CPU each, no GPU)."""
    spec = {"num": int(config.get("workers", 1)), "cpu": 1.0, "gpu": 0.0}
    spec.update({k: v for k, v in (config.get(WORKERS_KEY) or {}).items() if k in ("cpu", "gpu")})
    return spec


def trial_storage_path() -> str:
    """The running Tune trial's directory in the experiment's storage (shared storage on a cluster).

    ``tune.get_context().get_trial_dir()`` is a staging directory in the Ray session, which a restarted
    driver does not see again; the Train run (and its checkpoints) must live where a resume finds them.
    (``get_storage``: a DeveloperAPI of Ray, the trial session's StorageContext.)
    """
    return tune.get_context().get_storage().trial_fs_path


def run_trial_dp(method: str, config: Mapping[str, Any]) -> None:
    """The Tune trial: a Ray Train job of ``config["workers"]`` workers running ``method``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    spec = worker_spec(config)
    ctx = tune.get_context()
    use_gpu = spec["gpu"] > 0 and config.get("device", "auto") != "cpu"
    per_worker = {"CPU": spec["cpu"], **({"GPU": spec["gpu"]} if use_gpu else {})}
    storage, name = trial_storage_path(), f"train_{ctx.get_trial_id()}"  # stable: a retry or restore continues it
    run_dir = Path(storage) / name
    found = sorted(p.name for p in run_dir.glob("*")) if run_dir.is_dir() else []
    print(f"[{method}] Ray Train run {run_dir}: {spec['num']} workers x {per_worker}"
          + (f"; continuing (found {', '.join(found)})" if found else ""), flush=True)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"method": method, "config": dict(config), "run_dir": str(run_dir),
                           "threads": max(1, int(spec["cpu"])), "use_gpu": use_gpu, "gpu": spec["gpu"]},
        scaling_config=ScalingConfig(num_workers=spec["num"], use_gpu=use_gpu, resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=TIMEOUT_S),
        run_config=RunConfig(
            name=name,
            storage_path=storage,  # the trial's directory in the experiment's storage
            callbacks=[TuneReportCallback()],
            # Tune retries the trial and Train resumes it; a worker group that cannot start (its resources are
            # not free) fails the trial after a few tries instead of Train retrying forever
            failure_config=FailureConfig(max_failures=0, controller_failure_limit=CONTROLLER_FAILURES),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    from trainables.ray_internals import Reaper

    with Reaper():  # a group that a stopped trial's controller left reserved is released within seconds
        trainer.fit()


def _worker_loop(loop_config: dict) -> None:
    """One Train worker: ``Run`` on this rank's share; rank 0 reports metrics and the checkpoint."""
    import ray.train

    import trainables
    from regtune.distributed import DataParallel
    from regtune.loop import Run
    from regtune.reference import step_inputs

    method, config = loop_config["method"], loop_config["config"]
    torch.set_num_threads(loop_config["threads"])
    dp = DataParallel.from_torch()
    extras = config.get("__extras") or {}
    hparams = {k: v for k, v in config.items() if not k.startswith("__")}
    if loop_config["use_gpu"]:
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
        hparams["device"] = "cuda"
        if 0 < loop_config["gpu"] < 1:
            torch.cuda.set_per_process_memory_fraction(float(loop_config["gpu"]), device)
    elif hparams.get("device", "auto") == "auto":
        hparams["device"] = "cpu"
    run = Run(method, hparams, log=print if dp.rank == 0 else None, dp=dp)
    run.ctx.extras.update(extras)
    run.ctx.extras.update(step_inputs(method, extras))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            run.load_state_dict(trainables.load_checkpoint(d))  # rank 0's state, on every worker
        if dp.rank == 0:
            print(f"[{method}] resumed at step {run.step} on {dp.world_size} workers")
    last = None
    for report in run.reports():
        if dp.rank == 0:  # fault injection (tests): the worker dies, Train fails the trial, Tune retries it
            _maybe_die(run, Path(loop_config["run_dir"]), last)
        report["train/seconds"] = run.train_seconds
        report["workers"] = dp.world_size
        if dp.rank == 0:
            with tempfile.TemporaryDirectory() as d:
                torch.save(run.state_dict(), Path(d) / trainables.CHECKPOINT_FILE)
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(report)
        last = run.step


def _maybe_die(run, run_dir: Path, last_reported: int | None) -> None:
    """``fail_at_step`` for a Train worker: die once past it, but only after Train's controller has recorded
    the last reported checkpoint (it polls the workers; a worker dying right after ``report`` can take that
    report with it, and the test would then see an earlier resume point than the one it asked for)."""
    import trainables

    k = run.config.get("fail_at_step")
    if k is None or run.step <= k or (run_dir.parent / ".fail_at_step_done").exists():
        return
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 60
    while last_reported is not None and time.monotonic() < deadline:
        try:
            if json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["step"] >= last_reported:
                break
        except (OSError, ValueError, KeyError, TypeError):  # not written yet, or being written
            pass
        time.sleep(0.2)
    trainables._maybe_die(run, str(run_dir.parent))
