"""The Ray-free training loop that trainables and benchmarks share.

``Run(method, config)`` resolves and validates the config, seeds everything,
builds the task and the method, and ``Run.reports()`` trains, yielding one
report every ``eval_every`` steps (and at the last step). ``state_dict`` /
``load_state_dict`` capture everything needed to continue a run bit-for-bit:
model, optimizer, schedule, step, RNG states and the best-validation snapshot.

Data parallel (``regtune.distributed``): ``Run(..., dp=DataParallel.from_torch())``
in every worker of a process group. Every worker builds the same task, model
and optimizer from the config, takes rank 0's parameters, and steps on its share
of each global batch (the step functions all-reduce); buffers follow rank 0
after every step. Only rank 0 evaluates (the other ranks' reports carry the
training metrics only); rank 0's ``state_dict`` restores every worker. The
global torch RNG (dropout) of rank r is reseeded from (seed, rank, step) at the
start of each report interval, so dropout differs between shards and a resumed
run repeats itself.

A non-finite training loss ends the run with a finite sentinel report
(``diverged = 1``, the task metric at its worst) so schedulers that compare
numbers (ASHA) can stop it.
"""

from __future__ import annotations

import copy
import math
import random
import time
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from regtune.distributed import LOCAL, DataParallel
from regtune.methods import get_method, resolve_config
from regtune.space import ConfigError
from regtune.step import StepContext
from regtune.tasks.base import get_task

SENTINEL_LOSS = 1e9


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def lr_multiplier(config: Mapping[str, Any]):
    """Multiplier of the peak lr at step t (LambdaLR convention)."""
    total, warm, floor = config["steps"], config["warmup_steps"], config["lr_min_ratio"]
    if config["lr_schedule"] == "constant":
        return lambda t: 1.0

    def warmup_cosine(t: int) -> float:
        if t < warm:
            return (t + 1) / warm
        progress = min(1.0, (t - warm) / max(1, total - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return warmup_cosine


def _numpy_state() -> dict[str, Any]:
    # plain tensors and numbers, so checkpoints load with torch.load(weights_only=True)
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _set_numpy_state(s: Mapping[str, Any]) -> None:
    keys = s["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, s["pos"], s["has_gauss"], s["gauss"]))


class Run:
    def __init__(self, method: str, config: Mapping[str, Any], *, log=None, dp: DataParallel = LOCAL):
        self.method_name = method
        self.config = resolve_config(method, config)
        self.dp = dp
        if self.config["workers"] != dp.world_size:
            raise ConfigError(
                f"workers={self.config['workers']!r} is not allowed here: this process group has {dp.world_size}"
                " worker(s); a trial of several workers runs through Ray Train (`python -m studies run`,"
                " trainables.train_dp) or torch.distributed with regtune.distributed.DataParallel")
        self.method = get_method(method)
        self.task_def = get_task(self.config["task"])
        self.log = log or (lambda msg: None)
        seed_everything(self.config["seed"])
        self.device = pick_device(self.config["device"])
        self.task = self.task_def.build(self.config, self.device)
        self.model = self.task.model
        self.optimizer, self.param_summary = self.method.build(self.model, self.config)
        self.log(f"[{method}] {self.param_summary}")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_multiplier(self.config))
        self.generator = torch.Generator().manual_seed(self.config["seed"] + 7919)
        self.ctx = StepContext(self.model, self.optimizer, self.task, self.config, self.device,
                               generator=self.generator, dp=dp)
        dp.sync_model(self.model)  # identical seeds build identical models; rank 0's wins regardless
        self.step = 0
        self.best: dict[str, Any] = {"value": None, "step": None, "state": None}
        self.diverged = False
        self.train_seconds = 0.0
        self.test_max: float | None = None  # best test accuracy over evaluations (tasks with test_every_eval)

    # ------------------------------------------------------------------
    @property
    def metric(self) -> str:
        return self.task_def.metric

    def _better(self, value: float) -> bool:
        best = self.best["value"]
        if best is None:
            return True
        return value > best if self.task_def.mode == "max" else value < best

    def _sentinel(self) -> dict[str, float]:
        worst = 0.0 if self.task_def.mode == "max" else SENTINEL_LOSS
        out = {f"{s}/loss": SENTINEL_LOSS for s in ("train", "val")}
        out.update({"train/accuracy": 0.0, "val/accuracy": 0.0, self.metric: worst, "diverged": 1.0})
        return out

    def train_steps(self, n: int) -> dict[str, float]:
        """Take up to ``n`` steps; return the mean of each step metric over the steps that reported it."""
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        done = 0
        t0 = time.perf_counter()
        self.model.train()
        if self.dp.active:  # per-worker dropout stream, a function of (seed, rank, step): resumes repeat it
            torch.manual_seed(self.config["seed"] * 1_000_003 + self.dp.rank * 7919 + self.step)
        for _ in range(n):
            self.ctx.step = self.step
            metrics = self.method.step(self.ctx, self.task.train_batch(self.step))
            if self.dp.active:
                self.dp.sync_buffers(self.model)
            self.scheduler.step()
            self.step += 1
            done += 1
            if not math.isfinite(metrics["train/loss"]):
                self.diverged = True
                break
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
        self.train_seconds += time.perf_counter() - t0
        return {k: v / counts[k] for k, v in sums.items()}

    def evaluate(self) -> dict[str, float]:
        if self.dp.rank != 0:  # only rank 0 evaluates and reports
            return {}
        out = self.task.evaluate(self.model, "val")
        if getattr(self.task, "test_every_eval", False):  # e.g. IRE Table 1: the best test accuracy over epochs
            out.update(self.task.evaluate(self.model, "test"))
            acc = out.get("test/accuracy")
            if acc is not None and math.isfinite(acc):
                self.test_max = acc if self.test_max is None else max(self.test_max, acc)
            if self.test_max is not None:
                out["test/accuracy_max"] = self.test_max
        value = out.get(self.metric)
        if value is not None and math.isfinite(value) and self._better(value):
            self.best["value"], self.best["step"] = value, self.step
            if "test" in self.task_def.splits:
                self.best["state"] = copy.deepcopy(self.model.state_dict())
        return out

    def final_test(self, *, last: bool = True) -> dict[str, float]:
        """Test metrics of the last model (``last``: unless ``evaluate`` just scored it) and of the
        best-validation snapshot (rank 0 only under data parallelism)."""
        if "test" not in self.task_def.splits or self.dp.rank != 0:
            return {}
        out = self.task.evaluate(self.model, "test") if last else {}
        if self.best["state"] is not None:
            last = copy.deepcopy(self.model.state_dict())
            self.model.load_state_dict(self.best["state"])
            out.update({f"{k}_best": v for k, v in self.task.evaluate(self.model, "test").items()})
            self.model.load_state_dict(last)
        return out

    def reports(self) -> Iterator[dict[str, float]]:
        """Train to ``steps``, yielding a report at every ``eval_every`` boundary."""
        total, every = self.config["steps"], self.config["eval_every"]
        while self.step < total and not self.diverged:
            n = min(every - self.step % every, total - self.step)
            train = self.train_steps(n)
            if self.diverged:
                report = self._sentinel()
            else:
                report = {**train, **self.evaluate(), "diverged": 0.0}
                if self.step >= total:
                    report.update(self.final_test(last="test/accuracy" not in report))
            report["step"] = self.step
            report["lr"] = float(self.scheduler.get_last_lr()[0])
            report["best/" + self.metric] = self.best["value"] if self.best["value"] is not None \
                else report.get(self.metric, math.nan)
            report["best/step"] = self.best["step"] if self.best["step"] is not None else self.step
            extra = getattr(self.optimizer, "constraint_summary", None)
            if extra is not None and not self.diverged:
                report.update(extra())
            yield report

    # ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "best": self.best,
            "diverged": self.diverged,
            "train_seconds": self.train_seconds,
            "test_max": self.test_max,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": _numpy_state(),
                "random": random.getstate(),
                "method": self.generator.get_state(),
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.best = dict(state["best"])
        self.diverged = bool(state["diverged"])
        self.train_seconds = float(state["train_seconds"])
        self.test_max = state.get("test_max")
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
        _set_numpy_state(rng["numpy"])
        random.setstate(rng["random"])
        self.generator.set_state(rng["method"])
