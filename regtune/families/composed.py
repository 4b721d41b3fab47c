"""Compositions across the papers, registered from parts with no optimizer code of their own (regtune.compose).

=============== ==================================== ===========================================================
name            parts (innermost first)              what it is
=============== ==================================== ===========================================================
``sam_adamcpr`` adam + cpr + sam                     SAM over AdamCPR: AdamCPR steps with the gradient at
                                                     SAM's perturbed weights, then its constraint
``adamcpr_gn``  adam + gn_penalty + cpr              AdamCPR on the micro-batch gradient-norm-penalized gradient
``adamw_gn``    adamw + gn_penalty                   AdamW on the micro-batch gradient-norm-penalized gradient
``sgdm_ire``    sgd(momentum=0.9) + ire              SGD with heavy-ball momentum, with IRE
=============== ==================================== ===========================================================

``adamcpr_ire`` (AdamCPR + IRE) is registered with the IRE family. ``sgdm_ire``
has the hyperparameters of ``sgd_ire`` (whose momentum is a hyperparameter with
default 0); it differs by the base's default momentum, 0.9, the usual value.
Papers: CPR arXiv:2311.09058, SAM arXiv:2010.01412, IRE arXiv:2405.20763,
micro-batch penalties arXiv:2211.15853.
"""

from __future__ import annotations

from regtune.compose import compose
from regtune.methods import register_method
from regtune.parts import adam, adamw, cpr, gn_penalty, ire, sam, sgd

SAM_ADAMCPR = register_method(compose(
    "sam_adamcpr", base=adam(), wrappers=[cpr(), sam()],
    doc="SAM over AdamCPR: the AdamCPR step (Adam, then the CPR constraint) with SAM's perturbed gradient",
))
ADAMCPR_GN = register_method(compose(
    "adamcpr_gn", base=adam(), wrappers=[cpr()], estimator=gn_penalty(),
    doc="AdamCPR on the large-batch gradient with the micro-batch gradient-norm penalty",
))
ADAMW_GN = register_method(compose(
    "adamw_gn", base=adamw(), estimator=gn_penalty(),
    doc="AdamW on the large-batch gradient with the micro-batch gradient-norm penalty",
))
SGDM_IRE = register_method(compose(
    "sgdm_ire", base=sgd(momentum=0.9), wrappers=[ire()],
    doc="SGD with heavy-ball momentum (default 0.9) and IRE",
))
