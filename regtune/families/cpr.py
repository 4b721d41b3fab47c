"""CPR-paper methods: ``adamw``, ``adam_rescale``, ``adamcpr``.

Franke et al., Constrained Parameter Regularization, NeurIPS 2024,
https://arxiv.org/abs/2311.09058 (see METHODS.md section 1).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from regtune.methods import (
    ADAM_LR_SPACE,
    BETAS,
    CPR_PAPER,
    EPS,
    REG_EMBEDDING,
    WEIGHT_DECAY,
    Method,
    _adam_kwargs,
    lr_hp,
    register_method,
)
from regtune.optim import AdamCPR, AdamRescale, cpr_param_groups, decay_param_groups
from regtune.optim.adamcpr import KAPPA_INIT_METHODS, REG_FUNCTIONS
from regtune.space import ConfigError, HParam, LogUniform


def build_adamw(model, c: Mapping[str, Any]):
    groups, summary = decay_param_groups(model, weight_decay=c["weight_decay"],
                                         regularize_embedding=c["regularize_embedding"])
    return torch.optim.AdamW(groups, **_adam_kwargs(c)), summary


def build_adam_rescale(model, c: Mapping[str, Any]):
    groups, summary = cpr_param_groups(model, regularize_embedding=c["regularize_embedding"])
    return AdamRescale(groups, rescale_alpha=c["rescale_alpha"], **_adam_kwargs(c)), summary


def build_adamcpr(model, c: Mapping[str, Any]):
    groups, summary = cpr_param_groups(model, regularize_embedding=c["regularize_embedding"])
    opt = AdamCPR(
        groups,
        kappa_init_method=c["kappa_init_method"],
        kappa_init_param=c["kappa_init_param"],
        reg_function=c["reg_function"],
        kappa_update=c["kappa_update"],
        reg_step_size=c["reg_step_size"],
        **_adam_kwargs(c),
    )
    return opt, summary


def check_adamcpr(c: Mapping[str, Any]) -> None:
    method, param = c["kappa_init_method"], c["kappa_init_param"]
    if method == "warm_start" and not float(param).is_integer():
        raise ConfigError(f"kappa_init_param={param!r} is not allowed for warm_start: expected a whole number of steps")
    if method in ("uniform", "dependent") and param <= 0:
        raise ConfigError(f"kappa_init_param={param!r} is not allowed for {method}: expected > 0")


register_method(Method(
    name="adamw",
    build=build_adamw,
    hparams=(lr_hp(1e-3), BETAS, EPS, WEIGHT_DECAY, REG_EMBEDDING),
    space={"lr": ADAM_LR_SPACE, "weight_decay": LogUniform(1e-5, 1.0)},
    doc="AdamW, decoupled weight decay on regularized tensors only",
    paper=CPR_PAPER + " (baseline)",
    family="cpr",
))

register_method(Method(
    name="adam_rescale",
    build=build_adam_rescale,
    hparams=(
        lr_hp(1e-3), BETAS, EPS,
        HParam("rescale_alpha", 1.0, "joint norm of regularized weights, as a multiple of its init", low=0.0, low_open=True),
        HParam("regularize_embedding", True, "rescale nn.Embedding weights too", kind=bool),
    ),
    space={"lr": ADAM_LR_SPACE, "rescale_alpha": LogUniform(0.5, 16.0)},
    doc="Adam + rescaling of the joint weight norm to alpha x init (Omnigrok)",
    paper=CPR_PAPER + " (baseline, from Omnigrok arXiv:2210.01117)",
    family="cpr",
))

register_method(Method(
    name="adamcpr",
    build=build_adamcpr,
    hparams=(
        lr_hp(1e-3), BETAS, EPS,
        HParam("kappa_init_method", "dependent", "how the bound kappa is set", kind=str, choices=KAPPA_INIT_METHODS),
        HParam("kappa_init_param", 1.0, "uniform: kappa; dependent: factor; warm_start: steps", low=0.0),
        HParam("reg_function", "l2", "R(W): sum of squares or std", kind=str, choices=REG_FUNCTIONS),
        HParam("kappa_update", 1.0, "Lagrange multiplier update rate mu", low=0.0),
        HParam("reg_step_size", 200, "inflection_point: sample R every this many steps", kind=int, low=1),
        REG_EMBEDDING,
    ),
    space={"lr": ADAM_LR_SPACE, "kappa_init_param": LogUniform(0.5, 256.0)},
    doc="Adam + Constrained Parameter Regularization",
    paper=CPR_PAPER,
    family="cpr",
    check=check_adamcpr,
))
