"""Adam + Rescaling: Adam with the joint norm of the regularized weights held fixed.

From Liu et al., "Omnigrok: Grokking Beyond Algorithmic Data", ICLR 2023
(https://arxiv.org/abs/2210.01117), the baseline of the CPR paper
(https://arxiv.org/abs/2311.09058).

At construction every tensor of a ``regularize=True`` group is multiplied by
``rescale_alpha`` and the joint norm ``N0 = sqrt(sum ||W||^2)`` is recorded
(after that scaling). After every Adam step the same tensors are multiplied by
``N0 / N_t``, so the joint norm stays at ``alpha x`` its initial value. ``N0``
is kept in the group dict, so it survives ``state_dict`` round trips.
"""

from __future__ import annotations

from typing import Iterable

import torch

from regtune.optim.adamcpr import _require_flagged_groups


def _joint_norm(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(params)))


class AdamRescale(torch.optim.Adam):
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
        if not rescale_alpha > 0:
            raise ValueError(f"rescale_alpha={rescale_alpha!r} is not allowed: expected > 0")
        groups = _require_flagged_groups(params, reg_embedding=True)
        super().__init__(groups, lr=lr, betas=betas, eps=eps, weight_decay=0.0, foreach=foreach)
        with torch.no_grad():
            for group in self.param_groups:
                if group["regularize"] and group["params"]:
                    torch._foreach_mul_(group["params"], rescale_alpha)
                    group["target_norm"] = float(_joint_norm(group["params"]))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        super().step()
        for group in self.param_groups:
            if group["regularize"] and group["params"]:
                norm = _joint_norm(group["params"])
                torch._foreach_mul_(group["params"], group["target_norm"] / norm)
        return loss

    def joint_norm(self) -> float:
        return float(
            _joint_norm([p for g in self.param_groups if g["regularize"] for p in g["params"]])
        )
