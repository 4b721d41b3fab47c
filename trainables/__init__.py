"""Ray Tune function trainables, one per registered method.

``trainables.get("adamcpr")`` returns a Tune function trainable;
``trainables.space("adamcpr")`` returns the method's default search space as
``ray.tune`` domains. A search of one's own is three lines::

    from ray import tune
    import trainables
    tune.Tuner(trainables.get("adamcpr"),
               param_space={**trainables.space("adamcpr"), "task": "grokking",
                            "lr": tune.loguniform(1e-4, 1e-2)},
               tune_config=tune.TuneConfig(metric="val/accuracy", mode="max", num_samples=8)).fit()

Every trainable: validates its config (unknown keys and bad values raise
before any training), seeds torch/numpy/random from ``seed``, trains with
``regtune.loop.Run``, reports ``step``, ``train/loss``, ``train/accuracy``,
``val/loss``, ``val/accuracy`` (and method extras) every ``eval_every`` steps
with a checkpoint, resumes from ``tune.get_checkpoint()``, and ends with a
finite sentinel report when the loss diverges. In a study, a configuration or
data error is announced before it is raised, so the study does not retry it
(``trainables.permanent``).

Config keys starting with ``__`` are inputs from the study driver, not
hyperparameters (``__extras``: method inputs such as reference gradient norms;
``__workers``: per-worker resources of a multi-worker trial).

``workers`` = N > 1 runs the trial as a Ray Train job of N data-parallel
workers (``trainables.train_dp``); it reports and resumes like any trial.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from ray import tune

from regtune.loop import Run
from regtune.methods import Method, ensure_registered, get_method
from regtune.reference import step_inputs
from regtune.space import Choice, Domain, IntUniform, LogUniform, Uniform
from trainables import permanent
from trainables.quiet import sigterm_outside_finalizers

sigterm_outside_finalizers()  # in a trial process (imported on its main thread): no "Exception ignored ... SystemExit"

CHECKPOINT_FILE = "state.pt"


def to_tune(domain: Domain | Any) -> Any:
    """A ``regtune.space`` domain as a ``ray.tune`` domain (fixed values pass through)."""
    if isinstance(domain, LogUniform):
        return tune.loguniform(domain.low, domain.high)
    if isinstance(domain, Uniform):
        return tune.uniform(domain.low, domain.high)
    if isinstance(domain, IntUniform):
        return (tune.lograndint if domain.log else tune.randint)(domain.low, domain.high + 1)
    if isinstance(domain, Choice):
        return tune.choice(list(domain.values))
    return domain


def space(method: str | Method) -> dict[str, Any]:
    """The method's default search space as ``ray.tune`` domains (a name, or a record such as ``compose(...)``)."""
    record = method if isinstance(method, Method) else get_method(method)
    return {k: to_tune(v) for k, v in record.space.items()}


def _threads() -> int:
    try:
        cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    except Exception:  # outside a Tune session
        cpus = 1
    return max(1, int(cpus))


def _trial_resources() -> dict[str, float] | None:
    """The running trial's resources (``{"CPU": 2.0, "GPU": 0.25}``); None outside a Tune session."""
    with warnings.catch_warnings():  # outside a session Tune warns and returns None
        warnings.simplefilter("ignore")
        resources = tune.get_context().get_trial_resources()
    return None if resources is None else dict(resources.required_resources)


def trial_device(requested: str, gpus: float, cuda_available: bool) -> tuple[str, float | None]:
    """(device, GPU memory fraction) of a trial given ``gpus`` GPUs: ``auto`` means CUDA when the trial
    was given a GPU (and CUDA works), else the CPU. A fractional GPU caps the trial's share of GPU memory."""
    device = ("cuda" if gpus > 0 and cuda_available else "cpu") if requested == "auto" else requested
    fraction = float(gpus) if device == "cuda" and 0 < gpus < 1 else None
    return device, fraction


def load_checkpoint(directory: str | os.PathLike) -> dict[str, Any]:
    """A trial checkpoint's state: tensors, numbers and containers only (``weights_only=True``), so a
    checkpoint that pickles arbitrary objects (code) is refused with ``pickle.UnpicklingError``."""
    return torch.load(Path(directory) / CHECKPOINT_FILE, weights_only=True)


def _maybe_die(run: Run, marker_dir: str) -> None:
    """Fault injection for tests: the whole process dies once, past ``fail_at_step``, before its next report
    (mid-run: the steps since the last checkpoint are lost, and Tune has long had the last report)."""
    k = run.config.get("fail_at_step")
    marker = Path(marker_dir) / ".fail_at_step_done"
    if k is not None and run.step > k and not marker.exists():
        marker.touch()
        os._exit(17)


def run_trial(method: str, config: Mapping[str, Any]) -> None:
    if int(config.get("workers", 1)) > 1:  # a Ray Train job of several data-parallel workers
        from trainables.train_dp import run_trial_dp

        return run_trial_dp(method, config)
    try:
        _train(method, config)
    except permanent.PERMANENT as e:  # a config or data error: the study must not retry it (trainables.permanent)
        if permanent.in_study(config):
            permanent.report(e)
        raise


def _train(method: str, config: Mapping[str, Any]) -> None:
    from trainables.quiet import quiet_trial_process

    quiet_trial_process()  # no per-checkpoint log lines, no library deprecation noise in the study's output
    torch.set_num_threads(_threads())
    extras = config.get("__extras") or {}
    hparams = {k: v for k, v in config.items() if not k.startswith("__")}
    resources = _trial_resources()
    if resources is not None:  # in a Tune trial: the device follows the trial's resources
        device, fraction = trial_device(hparams.get("device", "auto"), resources.get("GPU", 0.0),
                                        torch.cuda.is_available())
        hparams["device"] = device
        if fraction is not None:
            torch.cuda.set_per_process_memory_fraction(fraction)
    run = Run(method, hparams, log=print)
    run.ctx.extras.update(extras)
    run.ctx.extras.update(step_inputs(method, extras))  # e.g. exter_graft's reference norms from earlier cells
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            run.load_state_dict(load_checkpoint(d))
        print(f"[{method}] resumed at step {run.step}")
    trial_dir = tune.get_context().get_trial_dir()
    for report in run.reports():
        _maybe_die(run, trial_dir)
        report["train/seconds"] = run.train_seconds
        with tempfile.TemporaryDirectory() as d:
            torch.save(run.state_dict(), Path(d) / CHECKPOINT_FILE)
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))


def get(method: str | Method) -> Callable[[dict], None]:
    """The Tune function trainable of ``method`` (named after it in Tune's tables): a registered name, or a
    method record (e.g. ``regtune.compose.compose(...)`` in a script), which travels with the trainable and is
    registered in the trial process."""
    record = ensure_registered(method) if isinstance(method, Method) else None
    name = record.name if record is not None else method
    get_method(name)  # unknown name -> ConfigError now, not inside a trial

    def trainable(config: dict) -> None:
        if record is not None:
            ensure_registered(record)
        run_trial(name, config)

    trainable.__name__ = trainable.__qualname__ = name
    return trainable


METHOD_KEY = "__method"


def by_config(name: str = "regtune") -> Callable[[dict], None]:
    """One trainable for several methods: each trial runs the method its config names under
    ``__method`` (the study driver runs the cells of a stage, one method each, in one experiment)."""

    def trainable(config: dict) -> None:
        if METHOD_KEY not in config:
            raise KeyError(f"config has no {METHOD_KEY!r} key naming the method to run")
        run_trial(config[METHOD_KEY], config)

    trainable.__name__ = trainable.__qualname__ = name
    return trainable
