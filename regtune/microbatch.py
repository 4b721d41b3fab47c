"""Micro-batch training steps of the implicit-regularization paper.

Novack et al., "Disentangling the Mechanisms Behind Implicit Regularization in
SGD", ICLR 2023, https://arxiv.org/abs/2211.15853 (METHODS.md section 2).

A step takes the task's large batch of ``batch_size`` = B examples, splits it
into K = ceil(B / m) micro-batches of ``micro_batch_size`` = m (the last one may
be smaller), runs one forward pass per micro-batch in train mode (so BatchNorm
uses per-micro-batch statistics, like ghost batch norm, and updates its running
statistics K times), and forms the large-batch direction

    g_B = (1/K) sum_k grad[ L_k + reg_lambda * R_k ]

(R_k from ``regtune.penalties``, differentiated exactly by double backward).
Then one step of the base optimizer on a transformed gradient. In the paper the
base is plain SGD; here it is whatever the method composes (``regtune.compose``:
any base, wrapped in CPR / SAM / IRE ...), and a penalty combines with a
transform (``make_step(penalty_kind, transform)``):

=================  ======================================================
``pseudo_gd``      g_B                               (no penalty)
``grad_norm`` ...  g_B                               (with R_k)
``iter_graft``     (|g_M| / |g_B|) g_B,  g_M the gradient of one random
                   micro-batch of the same step (drawn from ctx.generator)
``exter_graft``    (n_ref / |g_B|) g_B,  n_ref the norm a reference
                   small-batch ``sgd`` run logged (see below)
``ngd``            g_B / |g_B|
=================  ======================================================

External grafting contract: ``ctx.extras["reference_grad_norms"]`` holds the
reference run's gradient norms, either a mapping ``{step: norm}`` or a sequence
of ``(step, norm)`` pairs, where ``step`` is the 0-based optimizer step at which
the norm was measured (or at which the averaged interval starts). At step t the
norm used is the recorded value at the greatest recorded step <= 20 * (t // 20),
so values are held over 20-step blocks (the seed's logging period) and a
sparser record is held until its next entry. ``reference_norms_from_reports``
builds it from a reference run's loop reports (metric ``grad/full_norm`` of
``sgd``, which ``standard_step`` logs every step).

Metrics each step: ``train/loss`` (mean over micro-batches of L_k),
``train/accuracy`` (over the large batch), ``grad/micro_norm`` (mean over
micro-batches of ||grad L_k||^2, the paper's "average micro-batch gradient
norm"), ``grad/full_norm`` (|g_B| before any grafting), ``reg/value`` (mean
R_k; 0 without a penalty) and, for grafting, ``grad/graft_norm`` (the norm of
the step direction).

Data parallelism (``ctx.dp``, regtune.distributed): the K micro-batches of the
global batch are split over the workers in contiguous blocks of whole
micro-batches; each worker sums its micro-batches' gradients (penalty terms
included), the sums are all-reduced and divided by K, exactly the one-process
average. Penalty draws are taken in micro-batch order on every worker (a worker
draws and discards those of the micro-batches it does not own), so they are the
one-process draws; metrics are reduced over the workers.

Where we knowingly differ from the seed code: for ``fisher_trace``,
``avg_jacobian`` and ``unit_jacobian`` the data gradient grad L_k is not a
by-product of the step, and measuring its norm costs one more backward pass
per micro-batch; we measure it on every ``MICRO_NORM_EVERY``-th step (the
seed's logging period) and leave the key out on other steps (the loop averages
each metric over the steps that report it). The seed measured it on fresh
batches after the step; we measure it on the step's own micro-batches.
Grafting and NGD are not in the public seed code; they follow the paper's
definitions (grafting as in Agarwal et al., arXiv:2002.11803).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from regtune.penalties import PENALTIES, double_backward_attention, penalty, skip_draws
from regtune.step import StepContext, clip_gradients

MICRO_NORM_EVERY = 20  # steps between data-gradient norm measurements for fisher / jacobian penalties
EXTER_BLOCK = 20  # external grafting holds the reference norm over blocks of this many steps
REFERENCE_KEY = "reference_grad_norms"

TRANSFORMS = (None, "iter_graft", "exter_graft", "ngd")


# --------------------------------------------------------------------------
# external grafting reference
def reference_norm(reference: Mapping[int, float] | Sequence[tuple[int, float]], step: int,
                   block: int = EXTER_BLOCK) -> float:
    """The reference norm used at 0-based step ``step`` (held over ``block``-step blocks)."""
    pairs = reference.items() if isinstance(reference, Mapping) else reference
    items = sorted((int(s), v) for s, v in pairs)  # int(): keys read back from JSON are strings
    if not items:
        raise ValueError(f"{REFERENCE_KEY} is empty: exter_graft needs the reference sgd run's gradient norms")
    key = (step // block) * block
    value = None
    for s, v in items:
        if s > key:
            break
        value = v
    if value is None:
        raise ValueError(
            f"{REFERENCE_KEY} has no norm at or before step {key} (first recorded step: {items[0][0]});"
            " the reference sgd run must record from step 0"
        )
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{REFERENCE_KEY}[{key}] = {value!r} is not a finite non-negative norm")
    return value


def reference_norms_from_reports(reports: Iterable[Mapping[str, Any]],
                                 metric: str = "grad/full_norm") -> dict[int, float]:
    """``{interval start step: norm}`` from a reference run's loop reports.

    A loop report with ``step`` = s averages its train metrics over the steps
    since the previous report, so its value is keyed by the previous report's
    ``step`` (0 for the first). Reports without ``metric`` (diverged) are skipped.
    """
    out: dict[int, float] = {}
    start = 0
    for report in sorted(reports, key=lambda r: r["step"]):
        if metric in report and math.isfinite(float(report[metric])):
            out[start] = float(report[metric])
        start = int(report["step"])
    return out


def _reference_from_ctx(ctx: StepContext) -> Mapping[int, float] | Sequence[tuple[int, float]]:
    if REFERENCE_KEY not in ctx.extras:
        raise ValueError(
            f"exter_graft needs ctx.extras[{REFERENCE_KEY!r}]: the per-step gradient norms (grad/full_norm) of a"
            " reference small-batch sgd run on the same task, as {step: norm} or [(step, norm), ...]"
        )
    return ctx.extras[REFERENCE_KEY]


# --------------------------------------------------------------------------
# the step
def _sq(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack(torch._foreach_norm(list(tensors))).pow(2).sum()


def _direction(ctx: StepContext, inputs: torch.Tensor, targets: torch.Tensor, params: list[torch.Tensor],
               penalty_kind: str | None, measure: bool, pick: int | None) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """(1/K) sum_k grad[L_k + reg_lambda R_k] at the current weights, summed over the workers; and the raw sums
    of this worker's metrics (loss, correct, micro-batch squared norms, penalty values, the picked norm)."""
    model, task, dp = ctx.model, ctx.task, ctx.dp
    m = int(ctx.config["micro_batch_size"])
    k_count = math.ceil(inputs.shape[0] / m)
    lam = float(ctx.config.get("reg_lambda", 0.0)) if penalty_kind else 0.0
    own = range(*dp.bounds(k_count)[dp.rank])
    acc = [torch.zeros_like(p) for p in params]
    loss_sum = torch.zeros((), device=inputs.device)  # on the device: no host sync per micro-batch
    correct = torch.zeros((), device=inputs.device)
    micro_sq: list[torch.Tensor] = []
    reg_vals: list[torch.Tensor] = []
    pick_sq = None
    with torch.enable_grad(), (double_backward_attention() if penalty_kind else contextlib.nullcontext()):
        for k in range(k_count):
            x, y = inputs[k * m:(k + 1) * m], targets[k * m:(k + 1) * m]
            if k not in own:  # another worker's micro-batch: keep the method generator in step
                if penalty_kind is not None:
                    skip_draws(penalty_kind, (x.shape[0], task.num_classes), ctx.generator)
                continue
            logits = task.forward(model, x)
            loss = task.criterion(logits, y)
            if penalty_kind is None:
                g = torch.autograd.grad(loss, params, materialize_grads=True)
                torch._foreach_add_(acc, list(g))
                gsq = _sq(g)
            elif penalty_kind == "grad_norm":
                reg, g = penalty(penalty_kind, logits, loss, params, ctx.generator)
                g_reg = torch.autograd.grad(reg, params, materialize_grads=True)  # double backward
                torch._foreach_add_(acc, [t.detach() for t in g])
                torch._foreach_add_(acc, list(g_reg), alpha=lam)
                gsq = reg.detach()
                reg_vals.append(gsq)
            else:
                g = torch.autograd.grad(loss, params, retain_graph=True, materialize_grads=True) if measure else None
                reg, _ = penalty(penalty_kind, logits, loss, params, ctx.generator)
                if g is not None:
                    torch._foreach_add_(acc, list(g))
                    if reg.requires_grad:  # R_k can be constant in theta (a linear model's Jacobian penalties)
                        torch._foreach_add_(acc, list(torch.autograd.grad(reg, params, materialize_grads=True)),
                                            alpha=lam)
                    gsq = _sq(g)
                else:
                    # one traversal for both terms: the data gradient rides along the double backward
                    torch._foreach_add_(acc, list(torch.autograd.grad(loss + lam * reg, params, materialize_grads=True)))
                    gsq = None
                reg_vals.append(reg.detach())
            if gsq is not None:
                micro_sq.append(gsq)
            if k == pick:
                pick_sq = gsq
            loss_sum += loss.detach().float()
            correct += (logits.detach().argmax(-1) == y).sum()
            del logits, loss

    dp.all_sum_(acc)  # the sum over all K micro-batches on every worker (identity in one process)
    torch._foreach_div_(acc, float(k_count))
    stats = {"loss": loss_sum, "correct": correct, "micro_sq": micro_sq, "reg_vals": reg_vals, "pick_sq": pick_sq,
             "k_count": k_count}
    return acc, stats


def _graft_target(transform: str, pick_value: float, ref: float | None) -> float:
    return {"iter_graft": pick_value ** 0.5, "exter_graft": ref, "ngd": 1.0}[transform]


def microbatch_step(
    ctx: StepContext,
    batch: tuple[torch.Tensor, torch.Tensor],
    *,
    penalty_kind: str | None = None,
    transform: str | None = None,
    micro_norm_every: int = MICRO_NORM_EVERY,
) -> dict[str, float]:
    """One large-batch step; see the module docstring. Leaves the direction in ``p.grad``.

    ``penalty_kind`` and ``transform`` combine (e.g. a gradient-norm penalty with normalized steps); the base
    optimizer is whatever ``ctx.optimizer`` is. An optimizer that needs a closure (SAM) gets one that recomputes
    the whole transformed micro-batch direction at its perturbed weights (the same micro-batches; penalty
    draws are fresh draws from the method generator).
    """
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}")
    if penalty_kind is not None and penalty_kind not in PENALTIES:
        raise ValueError(f"unknown penalty {penalty_kind!r}; known: {', '.join(PENALTIES)}")
    inputs, targets = batch  # the global batch: this worker computes the micro-batches it owns
    model, opt, dp = ctx.model, ctx.optimizer, ctx.dp
    m = int(ctx.config["micro_batch_size"])
    n = inputs.shape[0]
    k_count = math.ceil(n / m)
    params = [p for p in model.parameters() if p.requires_grad]
    # reference first, so a missing reference fails before any work
    ref = reference_norm(_reference_from_ctx(ctx), ctx.step) if transform == "exter_graft" else None
    pick = int(torch.randint(k_count, (1,), generator=ctx.generator)) if transform == "iter_graft" else None
    data_grad_free = penalty_kind in (None, "grad_norm")
    measure = data_grad_free or transform == "iter_graft" or ctx.step % micro_norm_every == 0

    opt.zero_grad(set_to_none=True)
    acc, st = _direction(ctx, inputs, targets, params, penalty_kind, measure, pick)
    full_norm = float(_sq(acc).sqrt())
    loss_total, correct_total = float(st["loss"]), float(st["correct"])
    micro_total = float(torch.stack(st["micro_sq"]).sum()) if st["micro_sq"] else 0.0
    reg_total = float(torch.stack(st["reg_vals"]).sum()) if st["reg_vals"] else 0.0
    pick_value = float(st["pick_sq"]) if st["pick_sq"] is not None else 0.0
    if dp.active:
        loss_total, correct_total, micro_total, reg_total, pick_value = dp.sum_floats(
            [loss_total, correct_total, micro_total, reg_total, pick_value])
    metrics = {
        "train/loss": loss_total / k_count,
        "train/accuracy": correct_total / max(n, 1),
        "grad/full_norm": full_norm,
        "reg/value": reg_total / k_count if penalty_kind else 0.0,
    }
    if measure:
        metrics["grad/micro_norm"] = micro_total / k_count
    if transform is not None:
        target = _graft_target(transform, pick_value, ref)
        scale = target / full_norm if full_norm > 0 else 0.0
        torch._foreach_mul_(acc, scale)
        if transform != "ngd":
            metrics["grad/graft_norm"] = target
    for p, g in zip(params, acc):
        p.grad = g
    clip_gradients(ctx)
    if getattr(opt, "needs_closure", False):
        def closure() -> torch.Tensor:
            again, st2 = _direction(ctx, inputs, targets, params, penalty_kind, measure, pick)
            if transform is not None:
                norm = float(_sq(again).sqrt())
                picked = float(st2["pick_sq"]) if st2["pick_sq"] is not None else 0.0
                if dp.active and transform == "iter_graft":
                    (picked,) = dp.sum_floats([picked])
                target2 = _graft_target(transform, picked, ref)
                torch._foreach_mul_(again, target2 / norm if norm > 0 else 0.0)
            for p, g in zip(params, again):
                p.grad = g
            clip_gradients(ctx)
            return st2["loss"] / k_count

        opt.step(closure)
    else:
        opt.step()
    return metrics


_STEP_CACHE: dict[tuple[str | None, str | None], Any] = {}


def make_step(penalty_kind: str | None = None, transform: str | None = None):
    """The step function of a micro-batch estimator (``penalty_kind``, ``transform``); one function object per
    combination, so the published methods' steps (``STEPS``) are the ones compositions get."""
    key = (penalty_kind, transform)
    if key not in _STEP_CACHE:
        name = "_".join(x for x in (penalty_kind, transform) if x) or "pseudo_gd"
        _STEP_CACHE[key] = _named(penalty_kind, transform, name)
    return _STEP_CACHE[key]


def _named(penalty_kind: str | None, transform: str | None, name: str):
    def step(ctx: StepContext, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        return microbatch_step(ctx, batch, penalty_kind=penalty_kind, transform=transform)

    step.__name__ = step.__qualname__ = f"{name}_step"
    step.__doc__ = f"Micro-batch step of ``{name}`` (see regtune.microbatch)."
    return step


pseudo_gd_step = make_step(None, None)
grad_norm_step = make_step("grad_norm", None)
fisher_trace_step = make_step("fisher_trace", None)
avg_jacobian_step = make_step("avg_jacobian", None)
unit_jacobian_step = make_step("unit_jacobian", None)
iter_graft_step = make_step(None, "iter_graft")
exter_graft_step = make_step(None, "exter_graft")
ngd_step = make_step(None, "ngd")

STEPS = {
    "pseudo_gd": pseudo_gd_step,
    "grad_norm": grad_norm_step,
    "fisher_trace": fisher_trace_step,
    "avg_jacobian": avg_jacobian_step,
    "unit_jacobian": unit_jacobian_step,
    "iter_graft": iter_graft_step,
    "exter_graft": exter_graft_step,
    "ngd": ngd_step,
}
