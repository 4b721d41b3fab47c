"""CPR: Constrained Parameter Regularization as a wrapper around any base optimizer.

Franke et al., "Improving Deep Learning Optimization through Constrained
Parameter Regularization", NeurIPS 2024, https://arxiv.org/abs/2311.09058.

After the base optimizer's update (Adam in the paper's AdamCPR; here any torch
optimizer: SGD with or without momentum, Adam, AdamW, or another wrapper),
every tensor ``W`` of a group with ``regularize=True`` runs one step of an
augmented-Lagrangian constraint ``R(W) <= kappa``::

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

State: the wrapper is *transparent* (regtune.optim.wrapper): lambda, kappa and
the step count of each tensor live in the base's per-parameter state under
``cpr_*`` keys, written after the base's first step (torch optimizers set up
their own state when it is empty), so ``state_dict`` is the base's.

Where we knowingly differ from the ``pytorch-cpr`` 0.3.1 package:

* ``inflection_point`` follows the paper's definition above. The package's
  single-tensor path compares kappa with 1000 although it initializes it to
  1e6 and therefore never fires on CPU, and its multi-tensor path uses an EMA
  and a relative-growth threshold instead of the second difference.
* The base's parameter groups must carry an explicit ``regularize`` flag; a
  bare parameter iterable would silently disable the constraint.
* The constraint step uses ``torch._foreach`` kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from regtune.optim.wrapper import OptimizerWrapper

KAPPA_INIT_METHODS = ("uniform", "dependent", "warm_start", "inflection_point")
REG_FUNCTIONS = ("l2", "std")


def reg_values(params: list[torch.Tensor], reg_function: str) -> list[torch.Tensor]:
    """R(W) for each tensor, as 0-d float tensors."""
    if reg_function == "l2":
        return [p.square().sum() for p in params]
    return [p.std() for p in params]


def require_regularize_flags(groups: list[dict[str, Any]], who: str) -> None:
    for i, g in enumerate(groups):
        if "regularize" not in g:
            raise ValueError(f"{who}: parameter group {i} has no 'regularize' flag"
                             " (build the groups with regtune.optim.groups.cpr_param_groups / param_groups)")


def check_cpr_args(kappa_init_method: str, kappa_init_param: float, reg_function: str, kappa_update: float,
                   reg_step_size: int) -> None:
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


class CPR(OptimizerWrapper):
    """The CPR constraint after every step of ``base`` (see module docstring). Keyword names follow ``pytorch_cpr``."""

    wrapper_key = "cpr"
    transparent = True

    def __init__(
        self,
        base: torch.optim.Optimizer,
        *,
        kappa_init_method: str = "inflection_point",
        kappa_init_param: float = 1000.0,
        reg_function: str = "l2",
        kappa_update: float = 1.0,
        reg_step_size: int = 200,
    ):
        check_cpr_args(kappa_init_method, kappa_init_param, reg_function, kappa_update, reg_step_size)
        if isinstance(base, torch.optim.Optimizer):
            require_regularize_flags(base.param_groups, type(self).__name__)
        super().__init__(base)
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
            "cpr_step": 0,  # steps this tensor took (Adam's own ``step`` where the base is Adam)
        }

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):  # type: ignore[override]
        loss = None
        if closure is not None and not self.needs_closure:
            with torch.enable_grad():
                loss = closure()
            closure = None

        # R(W) before the first update, for parameters seen for the first time
        fresh: dict[torch.Tensor, torch.Tensor] = {}
        for group in self.param_groups:
            if group["regularize"]:
                new = [p for p in group["params"] if p.grad is not None and "cpr_kappa" not in self.state[p]]
                fresh.update(zip(new, reg_values(new, self.reg_function)))

        out = self.base.step(closure) if closure is not None else self.base.step()
        loss = out if closure is not None else loss

        for group in self.param_groups:
            if not group["regularize"]:
                continue
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                s = self.state[p]
                if p in fresh:
                    s.update(self._new_cpr_state(p, fresh[p]))
                elif "cpr_step" not in s:  # a checkpoint of the former Adam subclass: Adam's step count
                    s["cpr_step"] = int(s["step"])
                s["cpr_step"] += 1
            if params:
                self._constrain(params)
        return loss

    def _constrain(self, params: list[torch.Tensor]) -> None:
        states = [self.state[p] for p in params]
        step = int(states[0]["cpr_step"])
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
                s["cpr_kappa"] = reg_values([p], self.reg_function)[0].to(torch.float32)
                s["cpr_active"] = True
        elif method == "inflection_point" and step % self.reg_step_size == 0:
            waiting = [(p, s) for p, s in zip(params, states) if not s["cpr_active"]]
            values = reg_values([p for p, _ in waiting], self.reg_function)
            for (_, s), r in zip(waiting, values):
                growth = float(r) - s["cpr_last_r"]
                if s["cpr_last_growth"] is not None and growth - s["cpr_last_growth"] < 0:
                    s["cpr_kappa"] = r.to(torch.float32)
                    s["cpr_active"] = True
                    s["cpr_kappa_step"] = step
                s["cpr_last_r"], s["cpr_last_growth"] = float(r), growth

    # ------------------------------------------------------------------
    def constraint_summary(self) -> dict[str, float]:  # type: ignore[override]
        """Mean lambda, share of active constraints (and the base's extras), for logging."""
        base_summary = getattr(self.base, "constraint_summary", None)
        out = dict(base_summary()) if base_summary is not None else {}
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
        out.update({"cpr/lambda_mean": lag / max(n, 1), "cpr/active_share": active / max(n, 1)})
        return out
