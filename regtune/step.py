"""The training step.

A step function takes a ``StepContext`` and the step's batch, leaves the
gradients it wants in ``p.grad``, calls the optimizer, and returns the step's
training metrics (floats). Methods pick their step function in the registry;
``standard_step`` serves every method whose optimizer needs one forward and one
backward (AdamW, AdamCPR, Adam + rescaling, SGD) and those that re-evaluate the
loss through a closure (``optimizer.needs_closure = True``, e.g. SAM).

Optimizer hooks the standard step honours:

* ``optimizer.needs_closure``: pass a closure that recomputes loss and grads.
* ``optimizer.pre_step(ctx, batch)``: called before the gradient is computed
  (IRE refreshes its mask there).

Data parallelism (``regtune.distributed``): ``ctx.dp`` says which share of the
*global* batch this process computes; a step function receives the global batch,
takes its share, and all-reduces the gradient where it is complete (the standard
step: after the backward, in both SAM passes, before clipping and norms). In one
process ``ctx.dp`` is ``LOCAL`` and every collective is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from regtune.distributed import LOCAL, DataParallel, sync_gradients
from regtune.tasks.base import TaskInstance, accuracy


@dataclass
class StepContext:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    task: TaskInstance
    config: dict[str, Any]
    device: torch.device
    step: int = 0  # 0-based index of the step being taken
    generator: torch.Generator | None = None  # method randomness (sampled labels ...)
    extras: dict[str, Any] = field(default_factory=dict)  # method-specific inputs
    dp: DataParallel = LOCAL  # data-parallel rank / world size (regtune.distributed)


StepFn = Callable[[StepContext, tuple[torch.Tensor, torch.Tensor]], dict[str, float]]


def clip_gradients(ctx: StepContext) -> None:
    max_norm = ctx.config.get("max_grad_norm")
    if max_norm:
        nn.utils.clip_grad_norm_(ctx.model.parameters(), max_norm)


def global_grad_norm(model: nn.Module) -> float:
    """L2 norm of all parameter gradients together (0 when there are none)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))


def forward_backward(ctx: StepContext, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """Accumulate the gradient of the batch's mean loss in ``p.grad``, over ``accum_steps``
    sequential chunks (gradient accumulation: the same gradient in less memory; a
    BatchNorm model sees chunk statistics). Returns the batch's mean loss and accuracy."""
    k = ctx.config.get("accum_steps", 1)
    n = inputs.shape[0]
    loss_sum = acc_sum = 0.0
    for xs, ys in zip(inputs.tensor_split(k), targets.tensor_split(k)):
        if xs.shape[0] == 0:
            continue
        w = xs.shape[0] / n
        with torch.enable_grad():
            logits = ctx.task.forward(ctx.model, xs)
            loss = ctx.task.criterion(logits, ys)
            (loss * w if k > 1 else loss).backward()
        loss_sum += float(loss.detach()) * w
        acc_sum += accuracy(logits.detach(), ys) * w
    return loss_sum, acc_sum


def standard_step(ctx: StepContext, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    opt, dp = ctx.optimizer, ctx.dp
    pre_step = getattr(opt, "pre_step", None)
    if pre_step is not None:
        pre_step(ctx, batch)  # the global batch (IRE shards its mask pass itself)
    inputs, targets, weight = dp.shard(*batch)

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss, _ = forward_backward(ctx, inputs, targets)
        sync_gradients(dp, ctx.model, weight)  # SAM's second pass: the all-reduced gradient at w + e
        clip_gradients(ctx)
        return torch.tensor(loss)

    opt.zero_grad(set_to_none=True)
    loss, acc = forward_backward(ctx, inputs, targets)
    sync_gradients(dp, ctx.model, weight)
    full_norm = global_grad_norm(ctx.model)  # before clipping; exter_graft's reference reads it from sgd runs
    clip_gradients(ctx)
    if getattr(opt, "needs_closure", False):
        opt.step(closure)
    else:
        opt.step()
    if dp.active:
        loss, acc = dp.sum_floats([loss * weight, acc * weight])
    return {"train/loss": loss, "train/accuracy": acc, "grad/full_norm": full_norm}
