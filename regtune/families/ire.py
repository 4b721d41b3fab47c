"""IRE-paper methods: ``sam``, ``sgd_ire``, ``sam_ire``, ``adamw_ire``, ``adamcpr_ire``; and ``with_ire``.

Wang et al., "Improving Generalization and Convergence by Enhancing Implicit
Regularization", NeurIPS 2024, https://arxiv.org/abs/2405.20763 (METHODS.md
section 3). SAM: Foret et al., ICLR 2021, https://arxiv.org/abs/2010.01412
(adaptive: Kwon et al., arXiv:2102.11600).

``with_ire(method)`` turns any registered method into its IRE version: the
same builder wrapped in ``regtune.optim.IRE``, the method's hyperparameters
plus ``ire_rank``, ``ire_prog``, ``ire_interval``, ``ire_start`` (a step) or
``ire_start_frac`` (a share of ``steps``; at most one of the two),
``ire_prog_decay``, and its search space plus the IRE ranges. A user composes
IRE with a method of their own the same way::

    register_method(with_ire(get_method("my_method")))   # -> "my_method_ire"

IRE refreshes its mask in the optimizer hook ``pre_step``. ``standard_step``
calls it; for any other step function (e.g. the micro-batch steps)
``with_ire`` calls the hook before the step (the hook is idempotent per step).
With a micro-batch step the mask pass runs on the whole large batch at once.

``sam`` takes its base optimizer from ``sam_base``: ``sgd`` (the CIFAR /
ImageNet ResNet tables: lr, momentum, weight_decay as in ``sgd``) or ``adamw``
(the ViT tables: lr, betas, eps, weight_decay as in ``adamw``). The default lr
range is SGD's; ViT studies narrow it to Adam's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from regtune.families import common, cpr  # noqa: F401  (registers sgd, adamw, adamcpr first)
from regtune.families.common import SGD_HPARAMS, SGD_LR_SPACE, sgd_optimizer
from regtune.families.cpr import build_adamw
from regtune.methods import BETAS, EPS, Method, get_method, register_method
from regtune.optim.ire import IRE
from regtune.optim.sam import SAM
from regtune.space import HParam, LogUniform, Uniform
from regtune.step import StepFn, standard_step

IRE_PAPER = ("Wang et al., Improving Generalization and Convergence by Enhancing Implicit Regularization, "
             "NeurIPS 2024, arXiv:2405.20763")
SAM_PAPER = "Foret et al., Sharpness-Aware Minimization, ICLR 2021, arXiv:2010.01412"

IRE_HPARAMS: tuple[HParam, ...] = (
    HParam("ire_rank", 0.2, "share of coordinates treated as sharp (largest Fisher score) and NOT amplified;"
           " the paper's gamma = 1 - ire_rank", low=0.0, high=1.0),
    HParam("ire_prog", 2.0, "kappa: coordinates on the flat mask move (1 + kappa) x the base step", low=0.0),
    HParam("ire_interval", 10, "K: refresh the flatness mask every K optimizer steps", kind=int, low=1),
    HParam("ire_start", None, "first optimizer step (0-based) with IRE on, the first mask refresh (null: from"
           " ire_start_frac, or step 0 when that is null too)", kind=int, low=0, nullable=True),
    HParam("ire_start_frac", None, "IRE's start as a share of the run's steps: step round(ire_start_frac x steps)"
           " (the IRE paper's CIFAR code starts at epoch 70 of 200 = 0.35); set it or ire_start, not both",
           low=0.0, high=1.0, high_open=True, nullable=True),
    HParam("ire_prog_decay", False, "kappa_t = kappa * lr_t / lr_max (per parameter group)", kind=bool),
)
IRE_SPACE = {"ire_rank": Uniform(0.01, 0.9), "ire_prog": Uniform(0.0, 6.0)}
IRE_START_FRAC_SPACE = Uniform(0.0, 0.7)  # a range for studies that search the start (not in the default space)
IRE_EXCLUSIVE = (("ire_start", "ire_start_frac"),)

SAM_HPARAMS: tuple[HParam, ...] = (
    HParam("sam_rho", 0.05, "SAM perturbation radius rho (adaptive SAM needs ~10x larger)", low=0.0),
    HParam("sam_adaptive", False, "adaptive SAM (ASAM): perturbation scaled by |w|", kind=bool),
    HParam("sam_bn_second_pass", False, "let SAM's perturbed second pass update BatchNorm running statistics"
           " (false: they are kept out, as in davda54/sam)", kind=bool),
    HParam("sam_base", "sgd", "SAM's base optimizer", kind=str, choices=("sgd", "adamw")),
)
SAM_SPACE = {"lr": SGD_LR_SPACE, "sam_rho": LogUniform(0.01, 0.5)}


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


def _pre_step_then(inner: StepFn) -> StepFn:
    """A step function that calls the optimizer's ``pre_step`` hook before ``inner``."""
    if inner is standard_step:  # it calls the hook itself
        return inner

    def step(ctx, batch):
        hook = getattr(ctx.optimizer, "pre_step", None)
        if hook is not None:
            hook(ctx, batch)
        return inner(ctx, batch)

    step.__name__ = getattr(inner, "__name__", "step") + "_with_pre_step"
    return step


def with_ire(method: Method | str, *, name: str | None = None, doc: str | None = None,
             paper: str | None = None) -> Method:
    """The IRE version of ``method`` (a record or a registered name); not registered yet.

    Name: ``<method>_ire`` unless given. Raises ``ValueError`` when the method
    already declares an IRE hyperparameter (e.g. it is IRE-wrapped already).
    """
    base = get_method(method) if isinstance(method, str) else method
    clash = sorted({h.name for h in base.hparams} & {h.name for h in IRE_HPARAMS})
    if clash:
        raise ValueError(f"method {base.name!r} already declares {', '.join(clash)}; it cannot be IRE-wrapped again")
    base_build = base.build

    def build(model, c: Mapping[str, Any]):
        opt, summary = base_build(model, c)
        kw = ire_kwargs(c)
        ire = IRE(opt, **kw)
        frac = "" if c.get("ire_start") is not None or c.get("ire_start_frac") is None else \
            f" = {c['ire_start_frac']:g} x {c['steps']}"
        return ire, (f"IRE(rank={c['ire_rank']:g}, prog={c['ire_prog']:g}, every {c['ire_interval']} steps from step"
                     f" {kw['ire_start']}{frac}, decay={c['ire_prog_decay']}; {ire.num_keep:,} of {ire.num_coordinates:,}"
                     f" coordinates amplified) around {base.name}: {summary}")

    return replace(
        base,
        name=name or f"{base.name}_ire",
        build=build,
        hparams=tuple(base.hparams) + IRE_HPARAMS,
        space={**base.space, **IRE_SPACE},
        doc=doc or f"{base.doc}, with IRE (flat directions amplified by 1 + ire_prog)",
        paper=paper or f"{IRE_PAPER}; base: {base.paper}",
        family="ire",
        step=_pre_step_then(base.step),
        exclusive=tuple(base.exclusive) + IRE_EXCLUSIVE,
    )


def build_sam(model, c: Mapping[str, Any]):
    base, summary = sgd_optimizer(model, c) if c["sam_base"] == "sgd" else build_adamw(model, c)
    sam = SAM(base, rho=c["sam_rho"], adaptive=c["sam_adaptive"], model=model,
              bn_second_pass=c["sam_bn_second_pass"])
    kind = "adaptive SAM" if c["sam_adaptive"] else "SAM"
    return sam, f"{kind}(rho={c['sam_rho']:g}) around {c['sam_base']}: {summary}"


SAM_METHOD = register_method(Method(
    name="sam",
    build=build_sam,
    hparams=SGD_HPARAMS + (BETAS, EPS) + SAM_HPARAMS,
    space=SAM_SPACE,
    doc="SAM / adaptive SAM around SGD (sam_base=sgd) or AdamW (sam_base=adamw); two passes per step",
    paper=f"{SAM_PAPER}; baseline of {IRE_PAPER}",
    family="ire",
))

SGD_IRE = register_method(with_ire(
    get_method("sgd"), doc="SGD (momentum, L2 weight decay) with IRE"))
SAM_IRE = register_method(with_ire(
    SAM_METHOD, doc="SAM with IRE: mask from the unperturbed weights, IRE amplifies SAM's base step"))
ADAMW_IRE = register_method(with_ire(
    get_method("adamw"), doc="AdamW with IRE (Delta includes the decoupled weight decay)"))
ADAMCPR_IRE = register_method(with_ire(
    get_method("adamcpr"), doc="AdamCPR with IRE (Delta includes the CPR constraint step)"))

__all__ = ["IRE_HPARAMS", "IRE_SPACE", "IRE_START_FRAC_SPACE", "SAM_HPARAMS", "build_sam", "ire_kwargs",
           "ire_start_step", "with_ire"]
