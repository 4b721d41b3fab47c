"""Norm rescaling: the joint norm of the regularized weights held fixed, around any base optimizer.

From Liu et al., "Omnigrok: Grokking Beyond Algorithmic Data", ICLR 2023
(https://arxiv.org/abs/2210.01117), the baseline of the CPR paper
(https://arxiv.org/abs/2311.09058), where the base is Adam (``AdamRescale``).

At construction every tensor of a ``regularize=True`` group is multiplied by
``rescale_alpha`` and the joint norm ``N0 = sqrt(sum ||W||^2)`` is recorded
(after that scaling). After every step of the base optimizer the same tensors
are multiplied by ``N0 / N_t``, so the joint norm stays at ``alpha x`` its
initial value. ``N0`` is kept in the group dict (``target_norm``), so the
wrapper is transparent (regtune.optim.wrapper): its ``state_dict`` is the
base's, and survives round trips.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Iterable

import torch

from regtune.optim.cpr import require_regularize_flags
from regtune.optim.wrapper import OptimizerWrapper


def _joint_norm(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(params)))


class NormRescale(OptimizerWrapper):
    """Joint-norm rescaling of the ``regularize=True`` groups after each step of ``base``."""

    wrapper_key = "rescale"
    transparent = True

    def __init__(self, base: torch.optim.Optimizer, *, rescale_alpha: float = 1.0):
        if not rescale_alpha > 0:
            raise ValueError(f"rescale_alpha={rescale_alpha!r} is not allowed: expected > 0")
        if isinstance(base, torch.optim.Optimizer):
            require_regularize_flags(base.param_groups, type(self).__name__)
        super().__init__(base)
        with torch.no_grad():
            for group in self.param_groups:
                if group["regularize"] and group["params"]:
                    torch._foreach_mul_(group["params"], rescale_alpha)
                    group["target_norm"] = float(_joint_norm(group["params"]))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):  # type: ignore[override]
        loss = self.base_step(closure)
        for group in self.param_groups:
            if group["regularize"] and group["params"]:
                norm = _joint_norm(group["params"])
                torch._foreach_mul_(group["params"], group["target_norm"] / norm)
        return loss

    def joint_norm(self) -> float:
        return float(
            _joint_norm([p for g in self.param_groups if g["regularize"] for p in g["params"]])
        )


class AdamRescale(NormRescale):
    """Adam (no weight decay) + joint-norm rescaling of the regularized groups."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        *,
        rescale_alpha: float = 1.0,
        foreach: bool | None = None,
    ):
        from regtune.optim.adamcpr import _require_flagged_groups

        if not rescale_alpha > 0:
            raise ValueError(f"rescale_alpha={rescale_alpha!r} is not allowed: expected > 0")
        groups = _require_flagged_groups(params, reg_embedding=True)
        adam = torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps, weight_decay=0.0, foreach=foreach)
        super().__init__(adam, rescale_alpha=rescale_alpha)
