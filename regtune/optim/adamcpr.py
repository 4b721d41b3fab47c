"""AdamCPR: Adam with Constrained Parameter Regularization.

Franke et al., "Improving Deep Learning Optimization through Constrained
Parameter Regularization", NeurIPS 2024, https://arxiv.org/abs/2311.09058.

Adam (no weight decay) is taken from ``torch.optim.Adam`` unchanged. After
Adam's update, every tensor ``W`` of a group with ``regularize=True`` runs one
step of an augmented-Lagrangian constraint ``R(W) <= kappa``::

    lambda <- max(0, lambda + mu' * (R(W) - kappa))
    W      <- W - lambda * grad R(W)          # l2: W <- (1 - 2 lambda) W

with ``R = sum(W^2)`` (``l2``, ``mu' = kappa_update / numel``) or the unbiased
standard deviation (``std``, ``mu' = kappa_update``).

kappa initialization (``kappa_init_method``):

* ``uniform``: kappa = ``kappa_init_param`` (in R's units).
* ``dependent``: kappa = ``kappa_init_param`` x R(W) before the first update.
* ``warm_start``: no constraint for steps <= s (s = ``kappa_init_param``); at
  step s, kappa = R(W) after that step's update.
* ``inflection_point``: R(W) is sampled every ``reg_step_size`` steps (and once
  before the first update); kappa = R(W) at the first sample where the discrete
  second difference of the samples is negative (growth starts to slow); no
  constraint before that, per tensor.

Where we knowingly differ from the ``pytorch-cpr`` 0.3.1 package:

* ``inflection_point`` follows the paper's definition above. The package's
  single-tensor path compares kappa with 1000 although it initializes it to
  1e6 and therefore never fires on CPU, and its multi-tensor path uses an EMA
  and a relative-growth threshold instead of the second difference.
* Parameters must come in groups that carry an explicit ``regularize`` flag (or
  as an ``nn.Module``, grouped by ``regtune.optim.groups``); a bare parameter
  iterable is refused because it would silently disable the constraint.
* The constraint step uses ``torch._foreach`` kernels for every setting of
  ``foreach`` (the flag only selects Adam's implementation).

For ``uniform``, ``dependent`` and ``warm_start`` with ``l2`` the trajectory
matches the package to float32 round-off (tested).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from regtune.optim.groups import cpr_param_groups

KAPPA_INIT_METHODS = ("uniform", "dependent", "warm_start", "inflection_point")
REG_FUNCTIONS = ("l2", "std")


def _require_flagged_groups(params: Any, reg_embedding: bool) -> list[dict]:
    if isinstance(params, nn.Module):
        groups, _ = cpr_param_groups(params, regularize_embedding=reg_embedding)
        return groups
    params = list(params)
    if not params or not all(isinstance(g, dict) for g in params):
        raise ValueError(
            "AdamCPR needs parameter groups with a 'regularize' flag (or an nn.Module); "
            "a bare parameter list would regularize nothing. "
            "Use regtune.optim.groups.cpr_param_groups(model)."
        )
    for i, g in enumerate(params):
        if "regularize" not in g:
            raise ValueError(f"AdamCPR: parameter group {i} has no 'regularize' flag")
    return params


def _reg_values(params: list[torch.Tensor], reg_function: str) -> list[torch.Tensor]:
    """R(W) for each tensor, as 0-d float tensors."""
    if reg_function == "l2":
        return [p.square().sum() for p in params]
    return [p.std() for p in params]


class AdamCPR(torch.optim.Adam):
    """Adam + Constrained Parameter Regularization. Keyword names follow ``pytorch_cpr``."""

    def __init__(
        self,
        params: Iterable | nn.Module,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        kappa_init_method: str = "inflection_point",
        kappa_init_param: float = 1000.0,
        reg_function: str = "l2",
        kappa_update: float = 1.0,
        reg_step_size: int = 200,
        reg_embedding: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
    ):
        if kappa_init_method not in KAPPA_INIT_METHODS:
            raise ValueError(
                f"kappa_init_method={kappa_init_method!r} is not allowed: expected one of {KAPPA_INIT_METHODS}"
            )
        if reg_function not in REG_FUNCTIONS:
            raise ValueError(f"reg_function={reg_function!r} is not allowed: expected one of {REG_FUNCTIONS}")
        if kappa_update < 0:
            raise ValueError(f"kappa_update={kappa_update!r} is not allowed: expected >= 0")
        if reg_step_size < 1:
            raise ValueError(f"reg_step_size={reg_step_size!r} is not allowed: expected an integer >= 1")
        if kappa_init_method == "warm_start" and kappa_init_param < 0:
            raise ValueError(f"kappa_init_param={kappa_init_param!r} is not allowed for warm_start: expected >= 0 steps")
        groups = _require_flagged_groups(params, reg_embedding)
        super().__init__(groups, lr=lr, betas=betas, eps=eps, weight_decay=0.0, foreach=foreach, maximize=maximize)
        self.kappa_init_method = kappa_init_method
        self.kappa_init_param = float(kappa_init_param)
        self.reg_function = reg_function
        self.kappa_update = float(kappa_update)
        self.reg_step_size = int(reg_step_size)

    # ------------------------------------------------------------------
    def _new_cpr_state(self, p: torch.Tensor, r0: torch.Tensor) -> dict[str, Any]:
        n = p.numel()
        mu = self.kappa_update / n if self.reg_function == "l2" else self.kappa_update
        method = self.kappa_init_method
        kappa = {
            "uniform": torch.tensor(self.kappa_init_param),
            "dependent": self.kappa_init_param * r0,
        }.get(method, torch.tensor(0.0))
        return {
            "cpr_lagmul": torch.zeros((), dtype=torch.float32, device=p.device),
            "cpr_kappa": kappa.to(device=p.device, dtype=torch.float32),
            "cpr_mu": mu,
            "cpr_active": method in ("uniform", "dependent"),
            # inflection point detection: last sample of R and last growth
            "cpr_last_r": float(r0) if method == "inflection_point" else None,
            "cpr_last_growth": None,
        }

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # R(W) before the first update, for parameters seen for the first time
        fresh: dict[torch.Tensor, torch.Tensor] = {}
        for group in self.param_groups:
            if group["regularize"]:
                new = [p for p in group["params"] if p.grad is not None and "cpr_kappa" not in self.state[p]]
                fresh.update(zip(new, _reg_values(new, self.reg_function)))

        super().step()

        for group in self.param_groups:
            if not group["regularize"]:
                continue
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p in fresh:
                    self.state[p].update(self._new_cpr_state(p, fresh[p]))
            if params:
                self._constrain(params)
        return loss

    def _constrain(self, params: list[torch.Tensor]) -> None:
        states = [self.state[p] for p in params]
        step = int(states[0]["step"])
        active = [i for i, s in enumerate(states) if s["cpr_active"]]
        if active:
            ps = [params[i] for i in active]
            lagmuls = [states[i]["cpr_lagmul"] for i in active]
            kappas = [states[i]["cpr_kappa"] for i in active]
            if self.reg_function == "l2":
                r = torch._foreach_norm(ps)  # one read of W; R = ||W||^2
                torch._foreach_mul_(r, r)
            else:
                r = [p.std() for p in ps]
            violation = torch._foreach_sub(r, kappas)
            torch._foreach_mul_(violation, [states[i]["cpr_mu"] for i in active])
            torch._foreach_add_(lagmuls, violation)
            torch._foreach_clamp_min_(lagmuls, 0.0)
            if self.reg_function == "l2":
                # W <- (1 - 2 lambda) W: one read and one write of W
                factors = torch._foreach_mul(lagmuls, -2.0)
                torch._foreach_add_(factors, 1.0)
                torch._foreach_mul_(ps, factors)
            else:
                grads = [(p - p.mean()) / ((p.numel() - 1) * sd) for p, sd in zip(ps, r)]
                torch._foreach_addcmul_(ps, grads, lagmuls, value=-1.0)

        method = self.kappa_init_method
        if method == "warm_start" and step == int(self.kappa_init_param):
            for p, s in zip(params, states):
                s["cpr_kappa"] = _reg_values([p], self.reg_function)[0].to(torch.float32)
                s["cpr_active"] = True
        elif method == "inflection_point" and step % self.reg_step_size == 0:
            waiting = [(p, s) for p, s in zip(params, states) if not s["cpr_active"]]
            values = _reg_values([p for p, _ in waiting], self.reg_function)
            for (_, s), r in zip(waiting, values):
                growth = float(r) - s["cpr_last_r"]
                if s["cpr_last_growth"] is not None and growth - s["cpr_last_growth"] < 0:
                    s["cpr_kappa"] = r.to(torch.float32)
                    s["cpr_active"] = True
                    s["cpr_kappa_step"] = step
                s["cpr_last_r"], s["cpr_last_growth"] = float(r), growth

    # ------------------------------------------------------------------
    def constraint_summary(self) -> dict[str, float]:
        """Mean lambda, share of active constraints, for logging."""
        lag, active, n = 0.0, 0, 0
        for group in self.param_groups:
            if not group["regularize"]:
                continue
            for p in group["params"]:
                s = self.state.get(p, {})
                if "cpr_lagmul" in s:
                    n += 1
                    lag += float(s["cpr_lagmul"])
                    active += bool(s["cpr_active"])
        return {"cpr/lambda_mean": lag / max(n, 1), "cpr/active_share": active / max(n, 1)}
