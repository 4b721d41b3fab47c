"""Implicit-regularization-paper methods: large-batch SGD with micro-batch penalties, grafting, NGD.

Novack, Kaur, Marwah, Garg, Lipton, "Disentangling the Mechanisms Behind
Implicit Regularization in SGD", ICLR 2023, https://arxiv.org/abs/2211.15853
(METHODS.md section 2). Each is composed (regtune.compose) of the base
``plain_sgd()`` (no momentum, no weight decay), a micro-batch estimator
(``microbatch()`` or a penalty) and, for grafting and NGD, a transform; the
step functions in ``regtune.microbatch`` build the large-batch direction from
micro-batches and transform it. The small-batch baseline is ``sgd``
(regtune.families.common) with ``batch_size`` = the micro-batch size.

Seed names: PseudoGD = pseudo_gd, RegLoss = grad_norm, FishLoss =
fisher_trace, AvgJacLoss = avg_jacobian, UnitJacLoss = unit_jacobian,
IterGraft = iter_graft, ExterGraft = exter_graft, NGD = ngd. ``exter_graft``
needs ``ctx.extras["reference_grad_norms"]`` (see regtune.microbatch).
"""

from __future__ import annotations

from regtune.compose import compose
from regtune.methods import register_method
from regtune.parts import (
    BATCH_SIZE,
    IMPLICIT_PAPER,
    LAMBDA_SPACE,
    MICRO_BATCH_SIZE,
    REG_LAMBDA,
    check_batches,
    exter_graft,
    iter_graft,
    microbatch,
    ngd,
    penalty,
    plain_sgd,
)

PAPER = IMPLICIT_PAPER

RECORDS = (  # name, estimator, transform, doc, seed name
    ("pseudo_gd", microbatch, None, "large-batch SGD: the mean of micro-batch gradients (accumulated), one step",
     "PseudoGD / LB SGD"),
    ("grad_norm", lambda: penalty("grad_norm"), None,
     "large-batch SGD + mean squared norm of micro-batch loss gradients", "RegLoss / LB + GN"),
    ("fisher_trace", lambda: penalty("fisher_trace"), None,
     "large-batch SGD + micro-batch Fisher trace (labels sampled from the model)", "FishLoss / LB + FT"),
    ("avg_jacobian", lambda: penalty("avg_jacobian"), None,
     "large-batch SGD + squared norm of the gradient of the summed mean logits", "AvgJacLoss / LB + AJ"),
    ("unit_jacobian", lambda: penalty("unit_jacobian"), None,
     "large-batch SGD + squared norm of the gradient of a random unit projection of the mean logits",
     "UnitJacLoss / LB + UJ"),
    ("iter_graft", microbatch, iter_graft,
     "large-batch direction, step norm of one random micro-batch gradient (iterative grafting)", "IterGraft"),
    ("exter_graft", microbatch, exter_graft,
     "large-batch direction, step norm from a reference small-batch sgd run (external grafting)", "ExterGraft"),
    ("ngd", microbatch, ngd, "normalized large-batch gradient descent: theta -= lr g_B / |g_B|", "NGD"),
)

for _name, _estimator, _transform, _doc, _seed in RECORDS:
    register_method(compose(
        _name, base=plain_sgd(), estimator=_estimator(), transform=_transform() if _transform else None,
        doc=_doc, paper=f"{PAPER} ({_seed})", family="implicit",
    ))

__all__ = ["BATCH_SIZE", "LAMBDA_SPACE", "MICRO_BATCH_SIZE", "PAPER", "REG_LAMBDA", "check_batches"]
