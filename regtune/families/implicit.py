"""Implicit-regularization-paper methods: large-batch SGD with micro-batch penalties, grafting, NGD.

Novack, Kaur, Marwah, Garg, Lipton, "Disentangling the Mechanisms Behind
Implicit Regularization in SGD", ICLR 2023, https://arxiv.org/abs/2211.15853
(METHODS.md section 2). Base optimizer: plain ``torch.optim.SGD`` (no momentum,
no weight decay); the step functions in ``regtune.microbatch`` build the
large-batch direction from micro-batches and transform it. The small-batch
baseline is ``sgd`` (regtune.families.common) with ``batch_size`` = the
micro-batch size, set per task.

Seed names: PseudoGD = pseudo_gd, RegLoss = grad_norm, FishLoss =
fisher_trace, AvgJacLoss = avg_jacobian, UnitJacLoss = unit_jacobian,
IterGraft = iter_graft, ExterGraft = exter_graft, NGD = ngd. ``exter_graft``
needs ``ctx.extras["reference_grad_norms"]`` (see regtune.microbatch).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from regtune.methods import Method, lr_hp, register_method
from regtune.microbatch import STEPS
from regtune.space import ConfigError, HParam, LogUniform

PAPER = "Novack et al., Disentangling the Mechanisms Behind Implicit Regularization in SGD, ICLR 2023, arXiv:2211.15853"

BATCH_SIZE = HParam("batch_size", 5120, "large batch: examples per optimizer step", kind=int, low=1)
MICRO_BATCH_SIZE = HParam("micro_batch_size", 128, "micro-batch size m (own forward pass, own BatchNorm stats)",
                          kind=int, low=1)
REG_LAMBDA = HParam("reg_lambda", 0.01, "weight of the micro-batch penalty R_k", low=0.0)
LR_SPACE = LogUniform(1e-3, 1.0)
LAMBDA_SPACE = LogUniform(1e-5, 1.0)


def build_plain_sgd(model: torch.nn.Module, c: Mapping[str, Any]) -> tuple[torch.optim.Optimizer, str]:
    """Plain SGD on every trainable parameter (no momentum, no weight decay)."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    summary = (f"plain SGD lr={c['lr']:g} on {len(params)} tensors / {n:,} elements (no decay, no momentum);"
               f" batch {c['batch_size']} in micro-batches of {c['micro_batch_size']}")
    return torch.optim.SGD(params, lr=c["lr"], momentum=0.0, weight_decay=0.0), summary


def check_batches(c: Mapping[str, Any]) -> None:
    if c["micro_batch_size"] > c["batch_size"]:
        raise ConfigError(
            f"micro_batch_size={c['micro_batch_size']!r} is not allowed: expected <= batch_size={c['batch_size']}")


RECORDS = (
    ("pseudo_gd", False, "large-batch SGD: the mean of micro-batch gradients (accumulated), one step",
     "PseudoGD / LB SGD"),
    ("grad_norm", True, "large-batch SGD + mean squared norm of micro-batch loss gradients", "RegLoss / LB + GN"),
    ("fisher_trace", True, "large-batch SGD + micro-batch Fisher trace (labels sampled from the model)",
     "FishLoss / LB + FT"),
    ("avg_jacobian", True, "large-batch SGD + squared norm of the gradient of the summed mean logits",
     "AvgJacLoss / LB + AJ"),
    ("unit_jacobian", True,
     "large-batch SGD + squared norm of the gradient of a random unit projection of the mean logits",
     "UnitJacLoss / LB + UJ"),
    ("iter_graft", False, "large-batch direction, step norm of one random micro-batch gradient (iterative grafting)",
     "IterGraft"),
    ("exter_graft", False,
     "large-batch direction, step norm from a reference small-batch sgd run (external grafting)", "ExterGraft"),
    ("ngd", False, "normalized large-batch gradient descent: theta -= lr g_B / |g_B|", "NGD"),
)

for _name, _penalized, _doc, _seed in RECORDS:
    register_method(Method(
        name=_name,
        build=build_plain_sgd,
        hparams=(lr_hp(0.1), BATCH_SIZE, MICRO_BATCH_SIZE) + ((REG_LAMBDA,) if _penalized else ()),
        space={"lr": LR_SPACE, **({"reg_lambda": LAMBDA_SPACE} if _penalized else {})},
        doc=_doc,
        paper=f"{PAPER} ({_seed})",
        family="implicit",
        step=STEPS[_name],
        check=check_batches,
    ))
