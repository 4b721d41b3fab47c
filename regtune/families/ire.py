"""IRE-paper methods: ``sam``, ``sam_adamw``, ``sgd_ire``, ``sam_ire``, ``sam_adamw_ire``, ``adamw_ire``,
``adamcpr_ire``; and ``with_ire``.

Wang et al., "Improving Generalization and Convergence by Enhancing Implicit
Regularization", NeurIPS 2024, https://arxiv.org/abs/2405.20763 (METHODS.md
section 3). SAM: Foret et al., ICLR 2021, https://arxiv.org/abs/2010.01412
(adaptive: Kwon et al., arXiv:2102.11600).

Every record is composed (regtune.compose) of a base and the wrappers
``sam()`` and ``ire()`` (regtune.parts): ``sam`` = SGD (momentum, L2 decay)
wrapped in SAM (the CIFAR / ImageNet ResNet tables), ``sam_adamw`` = AdamW
wrapped in SAM (the ViT tables); a method has exactly its parts'
hyperparameters, so ``momentum`` is an unknown key of ``sam_adamw`` and
``betas`` of ``sam``.

``with_ire(method)`` turns any method record (composed or hand-built) into its
IRE version: the same builder wrapped in ``regtune.optim.IRE``, the method's
hyperparameters plus ``ire_rank``, ``ire_prog``, ``ire_interval``,
``ire_start`` (a step) or ``ire_start_frac`` (a share of ``steps``; at most one
of the two), ``ire_prog_decay``, and its search space plus the IRE ranges::

    register_method(with_ire(get_method("my_method")))   # -> "my_method_ire"

IRE refreshes its mask in the optimizer hook ``pre_step``. ``standard_step``
calls it; any other step function (e.g. the micro-batch steps) is preceded by
a call of the hook (it is idempotent per step). With a micro-batch step the
mask pass runs on the whole large batch at once.
"""

from __future__ import annotations

from regtune.compose import compose, extend
from regtune.methods import Method, get_method, register_method
from regtune.parts import (
    IRE_EXCLUSIVE,
    IRE_HPARAMS,
    IRE_PAPER,
    IRE_SPACE,
    IRE_START_FRAC_SPACE,
    SAM_HPARAMS,
    SAM_PAPER,
    adam,
    adamw,
    cpr,
    ire,
    ire_kwargs,
    ire_start_step,
    sam,
    sgd,
)


def with_ire(method: Method | str, *, name: str | None = None, doc: str | None = None,
             paper: str | None = None) -> Method:
    """The IRE version of ``method`` (a record or a registered name); not registered yet.

    Name: ``<method>_ire`` unless given. Raises ``ValueError`` when the method
    already declares an IRE hyperparameter (e.g. it is IRE-wrapped already).
    """
    record = get_method(method) if isinstance(method, str) else method
    return extend(record, ire(), name=name, paper=paper, family="ire",
                  doc=doc or f"{record.doc}, with IRE (flat directions amplified by 1 + ire_prog)")


SAM_METHOD = register_method(compose(
    "sam", base=sgd(), wrappers=[sam()],
    doc="SAM / adaptive SAM around SGD (momentum, L2 weight decay); two passes per step",
    paper=f"{SAM_PAPER}; baseline of {IRE_PAPER}", family="ire",
))
SAM_ADAMW = register_method(compose(
    "sam_adamw", base=adamw(), wrappers=[sam()],
    doc="SAM / adaptive SAM around AdamW (the ViT tables' SAM); two passes per step",
    paper=f"{SAM_PAPER}; baseline of {IRE_PAPER}", family="ire",
))
SGD_IRE = register_method(compose(
    "sgd_ire", base=sgd(), wrappers=[ire()], doc="SGD (momentum, L2 weight decay) with IRE",
    paper=f"{IRE_PAPER}", family="ire",
))
SAM_IRE = register_method(compose(
    "sam_ire", base=sgd(), wrappers=[sam(), ire()],
    doc="SAM (SGD base) with IRE: mask from the unperturbed weights, IRE amplifies SAM's base step",
    paper=f"{IRE_PAPER}; base: {SAM_PAPER}", family="ire",
))
SAM_ADAMW_IRE = register_method(compose(
    "sam_adamw_ire", base=adamw(), wrappers=[sam(), ire()],
    doc="SAM (AdamW base) with IRE: mask from the unperturbed weights, IRE amplifies SAM's base step",
    paper=f"{IRE_PAPER}; base: {SAM_PAPER}", family="ire",
))
ADAMW_IRE = register_method(compose(
    "adamw_ire", base=adamw(), wrappers=[ire()], doc="AdamW with IRE (Delta includes the decoupled weight decay)",
    paper=IRE_PAPER, family="ire",
))
ADAMCPR_IRE = register_method(compose(
    "adamcpr_ire", base=adam(), wrappers=[cpr(), ire()], doc="AdamCPR with IRE (Delta includes the CPR constraint step)",
    family="ire",
))

__all__ = ["IRE_EXCLUSIVE", "IRE_HPARAMS", "IRE_SPACE", "IRE_START_FRAC_SPACE", "SAM_HPARAMS", "ire_kwargs",
           "ire_start_step", "with_ire"]
