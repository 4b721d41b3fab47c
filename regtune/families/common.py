"""Methods shared by several papers: plain ``sgd`` (momentum and weight decay optional).

``sgd`` is the small-batch baseline of the implicit-regularization paper
(Novack et al., arXiv:2211.15853: no momentum, no decay, batch = micro-batch
size) and the SGD baseline of the IRE paper (Wang et al., arXiv:2405.20763:
momentum 0.9, weight decay 5e-4). Tasks set those defaults per method.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from regtune.methods import WEIGHT_DECAY, Method, lr_hp, register_method
from regtune.optim import decay_param_groups
from regtune.space import HParam, LogUniform

SGD_HPARAMS = (
    lr_hp(0.1),
    HParam("momentum", 0.0, "heavy-ball momentum", low=0.0, high=1.0, high_open=True),
    HParam("nesterov", False, "Nesterov momentum", kind=bool),
    WEIGHT_DECAY,
    HParam("regularize_embedding", False, "decay nn.Embedding weights too", kind=bool),
)
SGD_LR_SPACE = LogUniform(1e-3, 1.0)


def sgd_optimizer(model, c: Mapping[str, Any]):
    """torch SGD with L2 weight decay on the regularized tensors only."""
    groups, summary = decay_param_groups(model, weight_decay=c["weight_decay"],
                                         regularize_embedding=c["regularize_embedding"])
    opt = torch.optim.SGD(groups, lr=c["lr"], momentum=c["momentum"], nesterov=c["nesterov"] and c["momentum"] > 0)
    return opt, summary


register_method(Method(
    name="sgd",
    build=sgd_optimizer,
    hparams=SGD_HPARAMS,
    space={"lr": SGD_LR_SPACE},
    doc="SGD (optional momentum / L2 weight decay); one step per batch",
    paper="Novack et al. arXiv:2211.15853 (SB SGD); Wang et al. arXiv:2405.20763 (SGD baseline)",
    family="common",
))
