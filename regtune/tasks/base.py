"""The task contract and the task registry.

A task is data + model + loss + evaluation. It owns the loss (never a penalty
or weight decay: that is the method's business). Tasks register a ``Task``
record; ``Task.build(config, device)`` returns a ``TaskInstance``.

Contract of a ``TaskInstance`` (what the training loop and the methods use):

* ``model``: the ``nn.Module`` being trained, already on ``device``.
* ``train_batch(step) -> (inputs, targets)``: the batch of optimizer step
  ``step`` (0-based). It is a pure function of ``(config['seed'], step)`` so a
  resumed run sees the same data order without saving iterator state. Both
  tensors have examples along dim 0, so micro-batching slices dim 0.
* ``forward(model, inputs) -> logits`` with classes on the last dim.
* ``criterion(logits, targets) -> scalar mean loss`` (label smoothing etc.).
* ``evaluate(model, split) -> {f"{split}/loss": .., f"{split}/accuracy": ..}``
  for ``split`` in ``task.splits`` ("val" always, "test" where the task has it).
* ``num_classes``: size of the last dim of the logits.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import torch
from torch import nn

from regtune.space import ConfigError, HParam, suggest


class TaskInstance(Protocol):
    model: nn.Module
    num_classes: int

    def train_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def forward(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor: ...

    def criterion(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]: ...


@dataclass(frozen=True)
class Task:
    """A registered task.

    ``hparams``: the task's own hyperparameters (batch size, model width,
    schedule defaults ...). ``sizes``: named presets (``paper``, ``smoke`` ...)
    that override hparam defaults. ``loop_defaults``: defaults for the loop's
    hyperparameters (``steps``, ``eval_every``, ``lr_schedule`` ...) on this task.
    A task names no method and sets no method hyperparameter: a paper's optimizer
    settings are its study's recipe (``studies``), a method's defaults are generic.
    """

    name: str
    build: Callable[[Mapping[str, Any], torch.device], TaskInstance]
    hparams: tuple[HParam, ...]
    doc: str
    paper: str = ""
    sizes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    loop_defaults: Mapping[str, Any] = field(default_factory=dict)
    splits: tuple[str, ...] = ("val",)
    metric: str = "val/accuracy"
    mode: str = "max"
    # what one trial of this task asks the scheduler for, e.g. {"cpu": 2, "gpu": 0.25}
    resources: Mapping[str, float] = field(default_factory=lambda: {"cpu": 1, "gpu": 0})
    # resolved config -> the data sets its trials read (regtune.data.check.Need); None: made in memory
    data: Callable[[Mapping[str, Any]], tuple[Any, ...]] | None = None
    # (resolved config, the user's own config) -> None: fills derived values after validation
    # (e.g. the CIFAR IRE tasks' steps from epochs of the training images)
    finalize: Callable[[dict[str, Any], Mapping[str, Any]], None] | None = None

    @property
    def hparam_map(self) -> dict[str, HParam]:
        return {h.name: h for h in self.hparams}


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    if task.name in _TASKS:
        raise ValueError(f"task {task.name!r} registered twice")
    _TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    _load_builtin()
    if name not in _TASKS:
        raise ConfigError(
            f"unknown task {name!r}{suggest(name, _TASKS)}; known tasks: {', '.join(sorted(_TASKS))}"
        )
    return _TASKS[name]


def task_names() -> list[str]:
    _load_builtin()
    return sorted(_TASKS)


def _load_builtin() -> None:
    # Importing the package registers every built-in task family.
    import regtune.tasks  # noqa: F401


def maybe_bf16(enabled: bool):
    """bf16 autocast on CUDA when ``enabled`` (tasks set it only for CUDA devices), else a no-op context."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of correct argmax predictions (targets < 0 are ignored). Soft targets (class probabilities, e.g.
    Mixup / CutMix) count their most likely class."""
    if targets.is_floating_point() and targets.dim() == logits.dim():
        targets = targets.argmax(dim=-1)
    pred = logits.argmax(dim=-1)
    keep = targets >= 0
    n = int(keep.sum())
    return float((pred[keep] == targets[keep]).sum()) / max(n, 1)


@torch.no_grad()
def evaluate_batches(task: TaskInstance, model: nn.Module, batches, split: str) -> dict[str, float]:
    """Mean loss / accuracy over an iterable of ``(inputs, targets)`` batches."""
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0.0, 0
    for inputs, targets in batches:
        logits = task.forward(model, inputs)
        n = int((targets >= 0).sum())
        total_loss += float(task.criterion(logits, targets)) * n
        correct += accuracy(logits, targets) * n
        count += n
    model.train(was_training)
    return {f"{split}/loss": total_loss / max(count, 1), f"{split}/accuracy": correct / max(count, 1)}
