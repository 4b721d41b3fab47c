"""IRE: Implicit Regularization Enhancement, a wrapper around any base optimizer.

Wang et al., "Improving Generalization and Convergence by Enhancing Implicit
Regularization", NeurIPS 2024, https://arxiv.org/abs/2405.20763 (METHODS.md
section 3). Names: kappa = ``ire_prog``; gamma = 1 - ``ire_rank`` (``ire_rank``
is the share of coordinates treated as sharp and NOT amplified); K =
``ire_interval``; IRE is on from step ``ire_start`` (0-based).

Mask refresh (``refresh_mask``; the training loop calls it through
``pre_step`` at steps s >= ire_start with (s - ire_start) % K == 0): one extra
forward on the step's batch, labels y_hat ~ softmax(logits) drawn by inverse
CDF from one uniform per position (drawn from the method generator for the
whole batch, so a data-parallel worker uses its rows of the same draws), g = grad of the mean
cross-entropy CE(logits, y_hat) (no label smoothing; positions whose true
target is < 0 are ignored), score = g^2 (a diagonal Fisher proxy). One global
threshold over all trainable parameters: mask = 1 on exactly
k = round((1 - ire_rank) * N) coordinates, those with the smallest scores (the
flat directions); ties at the threshold go to the lower flat index (parameter
order of the base optimizer's groups, then element order; with parameters of
several dtypes or devices, buffer by buffer). The mask starts all
zero. BatchNorm running statistics are left exactly as they were by that pass.
Data parallel (``ctx.dp``, regtune.distributed): each worker runs the mask pass
on its share of the global batch with its rows of the global draws, the
gradients are combined into the global batch's mean gradient (all-reduce), and
every worker thresholds the same scores: one global mask, identical everywhere.

Step: theta_old = theta; base step (its state untouched); Delta = theta_new - theta_old;
theta <- theta_new + kappa_t * mask * Delta = theta_old + (1 + kappa_t * mask) * Delta.
Delta includes lr, momentum / Adam scaling, decoupled weight decay, a CPR
constraint step, and the whole SAM step when the base is SAM (its closure passes
through: ``needs_closure`` is the base's). ``ire_prog_decay``: kappa_t = kappa *
lr_t / lr_max per parameter group, lr_max = the group's ``initial_lr`` (set by
torch LR schedulers) or its lr when IRE was built.

Memory: ONE extra parameter-sized tensor (a flat buffer in the parameters'
dtype; one per (device, dtype) when those are mixed), allocated at the first
mask refresh. It stores the mask and theta_old together: a coordinate off the
mask holds NaN, a coordinate on the mask holds a finite number. Before the base
step ``buf = buf * 0 + theta`` keeps NaN off the mask and copies theta_old on
it; after the step ``buf = (buf - theta_new) * -kappa`` is kappa * Delta on the
mask (finite, so the coordinate stays on the mask) and NaN off it, and
``theta += nan_to_num(buf)`` applies the amplification. Transients: the mask
pass's gradients (like one backward), a bool vector during the threshold, and a
chunk-sized temporary for ``nan_to_num``. A coordinate whose update is NaN or
overflows drops out of the mask; that only happens in a diverged run.

Where we knowingly differ from the reference code (github.com/wmz9/IRE):
the reference ``SAMIRE`` keeps an EMA of g^2 across refreshes, and its CIFAR
script varies; we follow the paper's plain g^2 of one batch. The reference
selects ``score <= threshold`` with ``keep = int(...)``, which can select more
than the requested share when scores tie (e.g. many exact zeros); we select
exactly round((1 - ire_rank) * N) coordinates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from regtune.distributed import LOCAL, DataParallel
from regtune.optim.sam import preserved_bn_stats
from regtune.optim.wrapper import OptimizerWrapper

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 24  # cap on the nan_to_num temporary of one foreach call


def device_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """``generator`` itself when it lives on ``device``; otherwise a generator there seeded from it."""
    if generator is None or generator.device.type == device.type:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def label_uniforms(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """One uniform per position (``shape`` = the logits' shape without the class dim), drawn on ``device``."""
    return torch.rand(shape, generator=device_generator(generator, device), device=device, dtype=torch.float64)


def labels_from_uniforms(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws of y_hat ~ softmax(logits) (classes on the last dim) from uniforms ``u``."""
    flat = logits.detach().reshape(-1, logits.shape[-1]).double()
    cdf = torch.softmax(flat, dim=-1).cumsum(dim=-1)
    target = u.reshape(-1, 1).to(cdf.device) * cdf[:, -1:]
    labels = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=flat.shape[-1] - 1)
    return labels.reshape(logits.shape[:-1])


def sample_labels(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """y_hat ~ softmax(logits) per row of ``logits`` (classes on the last dim), shape ``logits.shape[:-1]``."""
    return labels_from_uniforms(logits, label_uniforms(tuple(logits.shape[:-1]), generator, logits.device))


def exact_smallest_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask with exactly ``k`` True entries on the ``k`` smallest ``scores`` (1-D).

    Ties at the threshold go to the lower index. NaN scores count as +inf.
    """
    n = scores.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k={k} is not in [0, {n}]")
    if k == 0:
        return torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k == n:
        return torch.ones(n, dtype=torch.bool, device=scores.device)
    scores = torch.nan_to_num(scores, nan=float("inf")) if scores.isnan().any() else scores
    kth = torch.kthvalue(scores, k).values
    sel = scores < kth
    need = k - int(sel.sum())
    ties = torch.nonzero(scores == kth).squeeze(1)[:need]
    sel[ties] = True
    return sel


class IRE(OptimizerWrapper):
    """Implicit Regularization Enhancement around ``base`` (see module docstring).

    Args:
        base: any torch optimizer, including ``SAM`` and ``AdamCPR``.
        ire_rank: share of coordinates treated as sharp (not amplified), in [0, 1].
        ire_prog: kappa >= 0; flat coordinates move (1 + kappa) x the base step.
        ire_interval: refresh the mask every this many steps (K >= 1).
        ire_start: first step (0-based) with IRE on; the first refresh happens there.
        ire_prog_decay: scale kappa by lr_t / lr_max of each parameter group.
    """

    wrapper_key = "ire"

    def __init__(
        self,
        base: torch.optim.Optimizer,
        *,
        ire_rank: float = 0.2,
        ire_prog: float = 2.0,
        ire_interval: int = 10,
        ire_start: int = 0,
        ire_prog_decay: bool = False,
    ):
        if not 0.0 <= ire_rank <= 1.0:
            raise ValueError(f"ire_rank={ire_rank!r} is not allowed: expected a number >= 0 and <= 1")
        if not ire_prog >= 0.0:
            raise ValueError(f"ire_prog={ire_prog!r} is not allowed: expected a number >= 0")
        if int(ire_interval) != ire_interval or ire_interval < 1:
            raise ValueError(f"ire_interval={ire_interval!r} is not allowed: expected an integer >= 1")
        if int(ire_start) != ire_start or ire_start < 0:
            raise ValueError(f"ire_start={ire_start!r} is not allowed: expected an integer >= 0")
        super().__init__(base)
        self.rank = float(ire_rank)
        self.prog = float(ire_prog)
        self.interval = int(ire_interval)
        self.start = int(ire_start)
        self.prog_decay = bool(ire_prog_decay)
        self.num_steps = 0  # optimizer steps taken through this wrapper
        self.num_refreshes = 0
        self._lr_max = [float(g["lr"]) for g in self.param_groups]
        seen: set[int] = set()
        self._params: list[nn.Parameter] = []
        for p in self.params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self._params.append(p)
        self._numel = sum(p.numel() for p in self._params)
        self._flat: list[torch.Tensor] | None = None  # the one extra buffer (see docstring)
        self._view: dict[nn.Parameter, torch.Tensor] = {}
        self._mask_ones = 0
        self._refreshed_at = -1  # pre_step refreshes at most once per step (idempotent hook)

    # ------------------------------------------------------------------
    @property
    def needs_closure(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.base, "needs_closure", False))

    @property
    def mask_params(self) -> list[nn.Parameter]:
        """The trainable parameters the mask covers, in the order ``mask`` / ``set_mask`` use (group order)."""
        return list(self._params)

    @property
    def num_coordinates(self) -> int:
        """N: the number of trainable coordinates the mask covers."""
        return self._numel

    @property
    def num_keep(self) -> int:
        """k = round((1 - ire_rank) * N): how many coordinates the mask amplifies."""
        return round((1.0 - self.rank) * self._numel)

    def mask_due(self) -> bool:
        s = self.num_steps
        return s >= self.start and (s - self.start) % self.interval == 0

    def kappas(self) -> list[float]:
        """kappa_t of each parameter group for the step about to be taken (0 before any refresh)."""
        if self._flat is None:
            return [0.0] * len(self.param_groups)
        out = []
        for i, g in enumerate(self.param_groups):
            kappa = self.prog
            if self.prog_decay:
                lr_max = float(g.get("initial_lr", self._lr_max[i] if i < len(self._lr_max) else g["lr"]))
                kappa = kappa * float(g["lr"]) / lr_max if lr_max > 0 else 0.0
            out.append(kappa)
        return out

    # ------------------------------------------------------------------ mask
    def _ensure_buffers(self) -> None:
        if self._flat is not None:
            return
        by_kind: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
        for p in self._params:
            by_kind.setdefault((p.device, p.dtype), []).append(p)
        self._flat, self._view = [], {}
        for (device, dtype), ps in by_kind.items():
            flat = torch.full((sum(p.numel() for p in ps),), float("nan"), device=device, dtype=dtype)
            offset = 0
            for p in ps:
                self._view[p] = flat[offset:offset + p.numel()].view(p.shape)
                offset += p.numel()
            self._flat.append(flat)

    @torch.no_grad()
    def _write_mask(self, sel: torch.Tensor) -> None:
        """Encode a flat bool mask (buffer order) into the buffers: 0 on the mask, NaN off it."""
        offset = 0
        for flat in self._flat:
            part = sel[offset:offset + flat.numel()].to(flat.device)
            flat.fill_(float("nan")).masked_fill_(part, 0.0)
            offset += flat.numel()
        self._mask_ones = int(sel.sum())

    @torch.no_grad()
    def set_mask_from_scores(self, scores: list[torch.Tensor | None]) -> None:
        """Mask = 1 on the k smallest of ``scores`` (one per trainable parameter, in group order; None = 0)."""
        if len(scores) != len(self._params):
            raise ValueError(f"expected {len(self._params)} score tensors, got {len(scores)}")
        self._ensure_buffers()
        for p, s in zip(self._params, scores):
            if s is None:
                self._view[p].zero_()
            else:
                self._view[p].copy_(s)
        flat = self._flat[0] if len(self._flat) == 1 else torch.cat(
            [f.float().to(self._flat[0].device) for f in self._flat])
        self._write_mask(exact_smallest_mask(flat, self.num_keep))
        self.num_refreshes += 1

    @torch.no_grad()
    def set_mask(self, mask: list[torch.Tensor]) -> None:
        """Set the mask directly (bool / 0-1 tensors, one per trainable parameter, in group order)."""
        if len(mask) != len(self._params):
            raise ValueError(f"expected {len(self._params)} mask tensors, got {len(mask)}")
        self._ensure_buffers()
        ones = 0
        for p, m in zip(self._params, mask):
            m = m.to(device=p.device, dtype=torch.bool).reshape(p.shape)
            self._view[p].fill_(float("nan")).masked_fill_(m, 0.0)
            ones += int(m.sum())
        self._mask_ones = ones

    def mask(self) -> list[torch.Tensor]:
        """The current mask as bool tensors, one per trainable parameter (all False before a refresh)."""
        if self._flat is None:
            return [torch.zeros_like(p, dtype=torch.bool) for p in self._params]
        return [~self._view[p].isnan() for p in self._params]

    def refresh_mask(
        self,
        model: nn.Module,
        inputs: Any,
        *,
        forward: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        targets: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        dp: DataParallel = LOCAL,
    ) -> None:
        """Recompute the mask from one forward on ``inputs`` with labels sampled from the model.

        ``dp``: data-parallel workers each compute their share of ``inputs`` (the global batch).
        """
        forward = forward or (lambda m, x: m(x))
        n = inputs.shape[0]
        s = dp.share(n)
        x = inputs[s] if dp.active else inputs
        t = targets[s] if dp.active and targets is not None else targets
        with torch.enable_grad(), preserved_bn_stats(model):
            logits = forward(model, x)
            u = label_uniforms((n, *logits.shape[1:-1]), generator, logits.device)  # the whole batch's draws
            labels = labels_from_uniforms(logits, u[s] if dp.active else u).reshape(-1)
            ignore = None
            if targets is not None and targets.numel() == n * labels.numel() // max(x.shape[0], 1):
                ignore = t.reshape(-1).to(labels.device) < 0
                labels = labels.masked_fill(ignore, IGNORE_INDEX)
            flat_logits = logits.reshape(-1, logits.shape[-1])
            if dp.active:  # this shard's part of the global batch's mean loss
                total = int((targets >= 0).sum()) if ignore is not None else n * labels.numel() // max(x.shape[0], 1)
                loss = F.cross_entropy(flat_logits.float(), labels, ignore_index=IGNORE_INDEX,
                                       reduction="sum") / max(total, 1)
            else:
                loss = F.cross_entropy(flat_logits.float(), labels, ignore_index=IGNORE_INDEX)
            grads = list(torch.autograd.grad(loss, self._params, allow_unused=True))
        if dp.active:  # the global batch's mean gradient on every worker
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self._params, grads)]
            dp.all_sum_(grads)
        self._ensure_buffers()
        with torch.no_grad():
            for p, g in zip(self._params, grads):
                view = self._view[p]
                if g is None:
                    view.zero_()
                else:
                    torch.mul(g, g, out=view)
        del grads
        flat = self._flat[0] if len(self._flat) == 1 else torch.cat(
            [f.float().to(self._flat[0].device) for f in self._flat])
        self._write_mask(exact_smallest_mask(flat, self.num_keep))
        self.num_refreshes += 1

    def pre_step(self, ctx, batch) -> None:
        """Loop hook (regtune.step): refresh the mask when due, from the unperturbed weights."""
        if self.mask_due() and self._refreshed_at != self.num_steps:
            self._refreshed_at = self.num_steps
            inputs, targets = batch
            self.refresh_mask(ctx.model, inputs, forward=ctx.task.forward, targets=targets,
                              generator=ctx.generator, dp=getattr(ctx, "dp", LOCAL))
        super().pre_step(ctx, batch)

    # ------------------------------------------------------------------ step
    def _group_pairs(self, group: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self._view[p], p) for p in group["params"] if p in self._view]

    @staticmethod
    def _chunks(pairs: list[tuple[torch.Tensor, torch.Tensor]]):
        chunk, size = [], 0
        for pair in pairs:
            chunk.append(pair)
            size += pair[1].numel()
            if size >= CHUNK_ELEMENTS:
                yield chunk
                chunk, size = [], 0
        if chunk:
            yield chunk

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):  # type: ignore[override]
        kappas = self.kappas()
        active = [(g, k) for g, k in zip(self.param_groups, kappas) if k != 0.0 and self._mask_ones > 0]
        for group, _ in active:  # buf = buf * 0 + theta: theta_old on the mask, NaN off it
            pairs = self._group_pairs(group)
            if pairs:
                views, params = map(list, zip(*pairs))
                torch._foreach_mul_(views, 0.0)
                torch._foreach_add_(views, params)
        loss = self.base.step(closure) if closure is not None else self.base.step()
        for group, kappa in active:
            for chunk in self._chunks(self._group_pairs(group)):
                views, params = map(list, zip(*chunk))
                torch._foreach_sub_(views, params)  # theta_old - theta_new = -Delta
                torch._foreach_mul_(views, -kappa)  # kappa * Delta on the mask, NaN off it
                inf = float("inf")
                torch._foreach_add_(params, [torch.nan_to_num(v, nan=0.0, posinf=inf, neginf=-inf) for v in views])
        self.num_steps += 1
        return loss

    # ------------------------------------------------------------------ state
    def wrapper_state(self) -> dict[str, Any]:
        return {
            "num_steps": self.num_steps,
            "num_refreshes": self.num_refreshes,
            "mask": None if self._flat is None else self.mask(),
        }

    def load_wrapper_state(self, state: dict[str, Any]) -> None:
        self.num_steps = int(state["num_steps"])
        self.num_refreshes = int(state["num_refreshes"])
        self._refreshed_at = -1
        if state["mask"] is None:
            self._flat, self._view, self._mask_ones = None, {}, 0
        else:
            self.set_mask(list(state["mask"]))

    @property
    def constraint_summary(self) -> Callable[[], dict[str, float]]:
        """Report extras: the base's (e.g. AdamCPR's) plus IRE's kappa_t and mask share."""
        base_summary = getattr(self.base, "constraint_summary", None)

        def summary() -> dict[str, float]:
            out = dict(base_summary()) if base_summary is not None else {}
            out["ire/kappa"] = self.kappas()[0] if self.param_groups else 0.0
            out["ire/mask_share"] = self._mask_ones / max(self._numel, 1)
            return out

        return summary
