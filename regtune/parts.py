"""The built-in parts of methods (regtune.compose): bases, wrappers, estimators, transforms.

Each part declares its hyperparameters and its default search ranges here, once;
a method composed of parts has the union of both. Defaults are generic (a
study module sets a paper's recipe). Papers: CPR, Franke et al.
arXiv:2311.09058; rescaling, Liu et al. arXiv:2210.01117; SAM, Foret et al.
arXiv:2010.01412; IRE, Wang et al. arXiv:2405.20763; micro-batch penalties,
grafting and NGD, Novack et al. arXiv:2211.15853 (METHODS.md).

=============== ========= =============================================================
part            role      hyperparameters
=============== ========= =============================================================
``sgd``         base      lr, momentum, nesterov, weight_decay, regularize_embedding
``plain_sgd``   base      lr (no momentum, no decay; all parameters in one group)
``adam``        base      lr, betas, eps (no weight decay)
``adamw``       base      lr, betas, eps, weight_decay, regularize_embedding
``cpr``         wrapper   kappa_init_method, kappa_init_param, reg_function, kappa_update,
                          reg_step_size, regularize_embedding
``rescale``     wrapper   rescale_alpha, regularize_embedding
``sam``         wrapper   sam_rho, sam_adaptive, sam_bn_second_pass
``ire``         wrapper   ire_rank, ire_prog, ire_interval, ire_start | ire_start_frac,
                          ire_prog_decay
``microbatch``  estimator batch_size, micro_batch_size
``gn_penalty``  estimator batch_size, micro_batch_size, reg_lambda (also ``ft_``, ``aj_``,
                          ``uj_penalty``: Fisher trace, average / unit Jacobian)
``iter_graft``  transform (none)  ``exter_graft``: (none; reads a reference run's norms)
``ngd``         transform (none)
=============== ========= =============================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from regtune.compose import Part
from regtune.methods import ADAM_LR_SPACE, BETAS, EPS, REG_EMBEDDING, WEIGHT_DECAY, _adam_kwargs, lr_hp
from regtune.optim import CPR, IRE, SAM, NormRescale
from regtune.optim.cpr import KAPPA_INIT_METHODS, REG_FUNCTIONS
from regtune.optim.groups import param_groups
from regtune.penalties import PENALTIES
from regtune.space import ConfigError, HParam, LogUniform, Uniform

CPR_PAPER = "Franke et al., Constrained Parameter Regularization, NeurIPS 2024, arXiv:2311.09058"
RESCALE_PAPER = "Liu et al., Omnigrok, ICLR 2023, arXiv:2210.01117"
SAM_PAPER = "Foret et al., Sharpness-Aware Minimization, ICLR 2021, arXiv:2010.01412"
IRE_PAPER = ("Wang et al., Improving Generalization and Convergence by Enhancing Implicit Regularization, "
             "NeurIPS 2024, arXiv:2405.20763")
IMPLICIT_PAPER = ("Novack et al., Disentangling the Mechanisms Behind Implicit Regularization in SGD, ICLR 2023, "
                  "arXiv:2211.15853")

# ---------------------------------------------------------------------------------------------- bases
SGD_LR_SPACE = LogUniform(1e-3, 1.0)
SGD_HPARAMS = (
    lr_hp(0.1),
    HParam("momentum", 0.0, "heavy-ball momentum", low=0.0, high=1.0, high_open=True),
    HParam("nesterov", False, "Nesterov momentum", kind=bool),
    WEIGHT_DECAY,
    HParam("regularize_embedding", False, "decay nn.Embedding weights too", kind=bool),
)


def _split(model, c: Mapping[str, Any], reg: dict[str, Any], free: dict[str, Any]):
    return param_groups(model, regularize_embedding=bool(c.get("regularize_embedding", False)), regularized=reg,
                        free=free)


def _make_sgd(model, c, reg, free):
    groups, summary = _split(model, c, {"weight_decay": c["weight_decay"], **reg}, {"weight_decay": 0.0, **free})
    opt = torch.optim.SGD(groups, lr=c["lr"], momentum=c["momentum"], nesterov=c["nesterov"] and c["momentum"] > 0)
    return opt, summary


def _make_plain_sgd(model, c, reg, free):
    if reg or free:  # a wrapper needs the regularized / free split (e.g. CPR's flag)
        groups, summary = _split(model, c, {"weight_decay": 0.0, **reg}, {"weight_decay": 0.0, **free})
        return torch.optim.SGD(groups, lr=c["lr"], momentum=0.0, weight_decay=0.0), summary
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    summary = f"plain SGD lr={c['lr']:g} on {len(params)} tensors / {n:,} elements (no decay, no momentum)"
    return torch.optim.SGD(params, lr=c["lr"], momentum=0.0, weight_decay=0.0), summary


def _make_adam(model, c, reg, free):
    groups, summary = _split(model, c, dict(reg), dict(free))
    return torch.optim.Adam(groups, weight_decay=0.0, **_adam_kwargs(c)), summary


def _make_adamw(model, c, reg, free):
    groups, summary = _split(model, c, {"weight_decay": c["weight_decay"], **reg}, {"weight_decay": 0.0, **free})
    return torch.optim.AdamW(groups, **_adam_kwargs(c)), summary


def sgd(**defaults: Any) -> Part:
    """torch SGD, optional heavy-ball / Nesterov momentum, L2 weight decay on the regularized tensors only."""
    return Part("sgd", "base", SGD_HPARAMS, {"lr": SGD_LR_SPACE}, doc="SGD (optional momentum / L2 weight decay)",
                label="SGD", make=_make_sgd).with_defaults(**defaults)


def plain_sgd(**defaults: Any) -> Part:
    """torch SGD without momentum or decay on every trainable parameter (the implicit-regularization paper's base)."""
    return Part("plain_sgd", "base", (lr_hp(0.1),), {"lr": SGD_LR_SPACE}, doc="plain SGD (no momentum, no decay)",
                label="plain SGD", make=_make_plain_sgd).with_defaults(**defaults)


def adam(**defaults: Any) -> Part:
    """torch Adam without weight decay (the base of CPR and of rescaling)."""
    return Part("adam", "base", (lr_hp(1e-3), BETAS, EPS), {"lr": ADAM_LR_SPACE}, doc="Adam (no weight decay)",
                label="Adam", make=_make_adam).with_defaults(**defaults)


def adamw(**defaults: Any) -> Part:
    """torch AdamW, decoupled weight decay on the regularized tensors only."""
    return Part("adamw", "base", (lr_hp(1e-3), BETAS, EPS, WEIGHT_DECAY, REG_EMBEDDING),
                {"lr": ADAM_LR_SPACE, "weight_decay": LogUniform(1e-5, 1.0)},
                doc="AdamW, decoupled weight decay on regularized tensors only", label="AdamW",
                make=_make_adamw).with_defaults(**defaults)


# ---------------------------------------------------------------------------------------------- wrappers
def _flag_groups(c: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    return {"regularize": True}, {"regularize": False}


CPR_HPARAMS = (
    HParam("kappa_init_method", "dependent", "how the bound kappa is set", kind=str, choices=KAPPA_INIT_METHODS),
    HParam("kappa_init_param", 1.0, "uniform: kappa; dependent: factor; warm_start: steps", low=0.0),
    HParam("reg_function", "l2", "R(W): sum of squares or std", kind=str, choices=REG_FUNCTIONS),
    HParam("kappa_update", 1.0, "Lagrange multiplier update rate mu", low=0.0),
    HParam("reg_step_size", 200, "inflection_point: sample R every this many steps", kind=int, low=1),
    REG_EMBEDDING,
)


def check_cpr(c: Mapping[str, Any]) -> None:
    method, param = c["kappa_init_method"], c["kappa_init_param"]
    if method == "warm_start" and not float(param).is_integer():
        raise ConfigError(f"kappa_init_param={param!r} is not allowed for warm_start: expected a whole number of steps")
    if method in ("uniform", "dependent") and param <= 0:
        raise ConfigError(f"kappa_init_param={param!r} is not allowed for {method}: expected > 0")


def _wrap_cpr(opt, model, c):
    wrapped = CPR(opt, kappa_init_method=c["kappa_init_method"], kappa_init_param=c["kappa_init_param"],
                  reg_function=c["reg_function"], kappa_update=c["kappa_update"], reg_step_size=c["reg_step_size"])
    return wrapped, f"CPR({c['kappa_init_method']}, {c['kappa_init_param']:g}, {c['reg_function']})"


def cpr(**defaults: Any) -> Part:
    """The CPR constraint R(W) <= kappa on every regularized tensor, after each step of the optimizer inside."""
    return Part("cpr", "wrapper", CPR_HPARAMS, {"kappa_init_param": LogUniform(0.5, 256.0)},
                doc="Constrained Parameter Regularization", paper=CPR_PAPER, label="CPR", check=check_cpr,
                wrap=_wrap_cpr, groups=_flag_groups).with_defaults(**defaults)


def _wrap_rescale(opt, model, c):
    return NormRescale(opt, rescale_alpha=c["rescale_alpha"]), f"rescaling(alpha={c['rescale_alpha']:g})"


def rescale(**defaults: Any) -> Part:
    """Joint norm of the regularized weights held at alpha x its initial value (Omnigrok's rescaling)."""
    return Part("rescale", "wrapper", (
        HParam("rescale_alpha", 1.0, "joint norm of regularized weights, as a multiple of its init", low=0.0,
               low_open=True),
        HParam("regularize_embedding", True, "rescale nn.Embedding weights too", kind=bool),
    ), {"rescale_alpha": LogUniform(0.5, 16.0)}, doc="rescaling of the joint weight norm to alpha x init",
        paper=RESCALE_PAPER, label="rescaling", wrap=_wrap_rescale, groups=_flag_groups).with_defaults(**defaults)


SAM_HPARAMS: tuple[HParam, ...] = (
    HParam("sam_rho", 0.05, "SAM perturbation radius rho (adaptive SAM needs ~10x larger)", low=0.0),
    HParam("sam_adaptive", False, "adaptive SAM (ASAM): perturbation scaled by |w|", kind=bool),
    HParam("sam_bn_second_pass", False, "let SAM's perturbed second pass update BatchNorm running statistics"
           " (false: they are kept out, as in davda54/sam)", kind=bool),
)


def _wrap_sam(opt, model, c):
    wrapped = SAM(opt, rho=c["sam_rho"], adaptive=c["sam_adaptive"], model=model,
                  bn_second_pass=c["sam_bn_second_pass"])
    return wrapped, f"{'adaptive SAM' if c['sam_adaptive'] else 'SAM'}(rho={c['sam_rho']:g})"


def sam(**defaults: Any) -> Part:
    """SAM / adaptive SAM: the optimizer inside steps with the gradient at the perturbed weights (two passes)."""
    return Part("sam", "wrapper", SAM_HPARAMS, {"sam_rho": LogUniform(0.01, 0.5)},
                doc="sharpness-aware perturbation", paper=SAM_PAPER, label="SAM", wrap=_wrap_sam).with_defaults(**defaults)


IRE_HPARAMS: tuple[HParam, ...] = (
    HParam("ire_rank", 0.2, "share of coordinates treated as sharp (largest Fisher score) and NOT amplified;"
           " the paper's gamma = 1 - ire_rank", low=0.0, high=1.0),
    HParam("ire_prog", 2.0, "kappa: coordinates on the flat mask move (1 + kappa) x the base step", low=0.0),
    HParam("ire_interval", 10, "K: refresh the flatness mask every K optimizer steps", kind=int, low=1),
    HParam("ire_start", None, "first optimizer step (0-based) with IRE on, the first mask refresh (null: from"
           " ire_start_frac, or step 0 when that is null too)", kind=int, low=0, nullable=True),
    HParam("ire_start_frac", None, "IRE's start as a share of the run's steps: step round(ire_start_frac x steps);"
           " set it or ire_start, not both", low=0.0, high=1.0, high_open=True, nullable=True),
    HParam("ire_prog_decay", False, "kappa_t = kappa * lr_t / lr_max (per parameter group)", kind=bool),
)
IRE_SPACE = {"ire_rank": Uniform(0.01, 0.9), "ire_prog": Uniform(0.0, 6.0)}
IRE_START_FRAC_SPACE = Uniform(0.0, 0.7)  # a range for studies that search the start (not in the default space)
IRE_EXCLUSIVE = (("ire_start", "ire_start_frac"),)


def ire_start_step(c: Mapping[str, Any]) -> int:
    """IRE's first step: ``ire_start``, else ``round(ire_start_frac x steps)``, else 0."""
    if c.get("ire_start") is not None:
        return int(c["ire_start"])
    if c.get("ire_start_frac") is not None:
        return int(round(float(c["ire_start_frac"]) * int(c["steps"])))
    return 0


def ire_kwargs(c: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: c[k] for k in ("ire_rank", "ire_prog", "ire_interval", "ire_prog_decay")}
    out["ire_start"] = ire_start_step(c)
    return out


def _wrap_ire(opt, model, c):
    kw = ire_kwargs(c)
    wrapped = IRE(opt, **kw)
    frac = "" if c.get("ire_start") is not None or c.get("ire_start_frac") is None else \
        f" = {c['ire_start_frac']:g} x {c['steps']}"
    return wrapped, (f"IRE(rank={c['ire_rank']:g}, prog={c['ire_prog']:g}, every {c['ire_interval']} steps from step"
                     f" {kw['ire_start']}{frac}, decay={c['ire_prog_decay']}; {wrapped.num_keep:,} of"
                     f" {wrapped.num_coordinates:,} coordinates amplified)")


def ire(**defaults: Any) -> Part:
    """IRE: the flat coordinates (smallest Fisher scores) move (1 + ire_prog) x the step of the optimizer inside."""
    return Part("ire", "wrapper", IRE_HPARAMS, IRE_SPACE, doc="IRE (flat directions amplified by 1 + ire_prog)",
                paper=IRE_PAPER, label="IRE", exclusive=IRE_EXCLUSIVE, wrap=_wrap_ire, pre_step=True).with_defaults(**defaults)


# ---------------------------------------------------------------------------------------------- estimators
BATCH_SIZE = HParam("batch_size", 5120, "large batch: examples per optimizer step", kind=int, low=1)
MICRO_BATCH_SIZE = HParam("micro_batch_size", 128, "micro-batch size m (own forward pass, own BatchNorm stats)",
                          kind=int, low=1)
REG_LAMBDA = HParam("reg_lambda", 0.01, "weight of the micro-batch penalty R_k", low=0.0)
LAMBDA_SPACE = LogUniform(1e-5, 1.0)
PENALTY_PARTS = {"grad_norm": "gn_penalty", "fisher_trace": "ft_penalty", "avg_jacobian": "aj_penalty",
                 "unit_jacobian": "uj_penalty"}
PENALTY_LABELS = {"grad_norm": "GN", "fisher_trace": "FT", "avg_jacobian": "AJ", "unit_jacobian": "UJ"}


def check_batches(c: Mapping[str, Any]) -> None:
    if c["micro_batch_size"] > c["batch_size"]:
        raise ConfigError(
            f"micro_batch_size={c['micro_batch_size']!r} is not allowed: expected <= batch_size={c['batch_size']}")


def _batches(c: Mapping[str, Any]) -> str:
    return f"batch {c['batch_size']} in micro-batches of {c['micro_batch_size']}"


def microbatch(**defaults: Any) -> Part:
    """The large-batch gradient as the mean of micro-batch gradients (each micro-batch its own forward pass)."""
    return Part("microbatch", "estimator", (BATCH_SIZE, MICRO_BATCH_SIZE), doc="micro-batch accumulation",
                paper=IMPLICIT_PAPER, label="micro-batch", check=check_batches, describe=_batches).with_defaults(**defaults)


def penalty(kind: str, **defaults: Any) -> Part:
    """Micro-batch accumulation of grad[L_k + reg_lambda R_k], R_k the penalty ``kind`` (regtune.penalties)."""
    if kind not in PENALTIES:
        raise ValueError(f"unknown penalty {kind!r}; known: {', '.join(PENALTIES)}")
    return Part(PENALTY_PARTS[kind], "estimator", (BATCH_SIZE, MICRO_BATCH_SIZE, REG_LAMBDA),
                {"reg_lambda": LAMBDA_SPACE}, doc=f"micro-batch {kind} penalty", paper=IMPLICIT_PAPER,
                label=f"{PENALTY_LABELS[kind]} penalty", check=check_batches, penalty=kind,
                describe=lambda c: f"{_batches(c)}, {kind} penalty x {c['reg_lambda']:g}").with_defaults(**defaults)


def gn_penalty(**defaults: Any) -> Part:
    """Penalty: the squared norm of each micro-batch's loss gradient."""
    return penalty("grad_norm", **defaults)


def ft_penalty(**defaults: Any) -> Part:
    """Penalty: each micro-batch's Fisher trace (labels sampled from the model)."""
    return penalty("fisher_trace", **defaults)


def aj_penalty(**defaults: Any) -> Part:
    """Penalty: the squared norm of the gradient of the micro-batch's summed mean logits."""
    return penalty("avg_jacobian", **defaults)


def uj_penalty(**defaults: Any) -> Part:
    """Penalty: the squared norm of the gradient of a random unit projection of the mean logits."""
    return penalty("unit_jacobian", **defaults)


# ---------------------------------------------------------------------------------------------- transforms
def iter_graft() -> Part:
    """Step norm of one random micro-batch's gradient, direction of the large-batch gradient."""
    return Part("iter_graft", "transform", doc="iterative grafting", paper=IMPLICIT_PAPER, label="iterative grafting",
                transform="iter_graft", describe=lambda c: "grafted: norm of one random micro-batch gradient")


def exter_graft() -> Part:
    """Step norm from a reference small-batch sgd run (ctx.extras['reference_grad_norms']), large-batch direction."""
    from regtune.microbatch import REFERENCE_KEY

    return Part("exter_graft", "transform", doc="external grafting", paper=IMPLICIT_PAPER, label="external grafting",
                transform="exter_graft", reads=(REFERENCE_KEY,),
                describe=lambda c: "grafted: norm of a reference sgd run")


def ngd() -> Part:
    """Normalized direction: the large-batch gradient divided by its norm."""
    return Part("ngd", "transform", doc="normalized gradient", paper=IMPLICIT_PAPER, label="NGD", transform="ngd",
                describe=lambda c: "normalized (NGD)")


BASES = {"sgd": sgd, "plain_sgd": plain_sgd, "adam": adam, "adamw": adamw}
WRAPPERS = {"cpr": cpr, "rescale": rescale, "sam": sam, "ire": ire}
ESTIMATORS = {"microbatch": microbatch, "gn_penalty": gn_penalty, "ft_penalty": ft_penalty, "aj_penalty": aj_penalty,
              "uj_penalty": uj_penalty}
TRANSFORMS = {"iter_graft": iter_graft, "exter_graft": exter_graft, "ngd": ngd}

__all__ = ["BASES", "ESTIMATORS", "IRE_HPARAMS", "IRE_SPACE", "IRE_START_FRAC_SPACE", "SAM_HPARAMS", "SGD_HPARAMS",
           "TRANSFORMS", "WRAPPERS", "adam", "adamw", "aj_penalty", "cpr", "exter_graft", "ft_penalty", "gn_penalty",
           "ire", "ire_kwargs", "ire_start_step", "iter_graft", "microbatch", "ngd", "penalty", "plain_sgd", "rescale",
           "sam", "sgd", "uj_penalty"]
