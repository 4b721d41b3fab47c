"""AdamCPR: Adam with Constrained Parameter Regularization, = ``CPR(torch.optim.Adam(groups))``.

Franke et al., "Improving Deep Learning Optimization through Constrained
Parameter Regularization", NeurIPS 2024, https://arxiv.org/abs/2311.09058.

Adam (no weight decay) is ``torch.optim.Adam`` unchanged; the constraint is the
``CPR`` wrapper of ``regtune.optim.cpr`` (the rule, the kappa initializations and
where we differ from the ``pytorch-cpr`` package are documented there). This
class keeps the package's constructor (keyword names of ``pytorch_cpr.AdamCPR``)
and its checkpoint layout (an Adam ``state_dict`` with ``cpr_*`` entries).

Parameters must come in groups that carry an explicit ``regularize`` flag (or
as an ``nn.Module``, grouped by ``regtune.optim.groups``); a bare parameter
iterable is refused because it would silently disable the constraint.

For ``uniform``, ``dependent`` and ``warm_start`` with ``l2`` and ``std`` the
trajectory matches the package to float32 round-off (tested).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from regtune.optim.cpr import CPR, KAPPA_INIT_METHODS, REG_FUNCTIONS, check_cpr_args
from regtune.optim.groups import cpr_param_groups

__all__ = ["KAPPA_INIT_METHODS", "REG_FUNCTIONS", "AdamCPR"]


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


class AdamCPR(CPR):
    """Adam + Constrained Parameter Regularization: ``CPR`` around ``torch.optim.Adam`` (no weight decay)."""

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
        check_cpr_args(kappa_init_method, kappa_init_param, reg_function, kappa_update, reg_step_size)
        groups = _require_flagged_groups(params, reg_embedding)
        adam = torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps, weight_decay=0.0, foreach=foreach,
                                maximize=maximize)
        super().__init__(adam, kappa_init_method=kappa_init_method, kappa_init_param=kappa_init_param,
                         reg_function=reg_function, kappa_update=kappa_update, reg_step_size=reg_step_size)
