"""Methods shared by several papers: plain ``sgd`` (momentum and weight decay optional).

``sgd`` is the small-batch baseline of the implicit-regularization paper
(Novack et al., arXiv:2211.15853: no momentum, no decay, batch = micro-batch
size) and the SGD baseline of the IRE paper (Wang et al., arXiv:2405.20763:
momentum 0.9, weight decay 5e-4). Study modules set those recipes.
"""

from __future__ import annotations

from regtune.compose import compose
from regtune.methods import register_method
from regtune.parts import SGD_HPARAMS, SGD_LR_SPACE, sgd

register_method(compose(
    "sgd", base=sgd(),
    doc="SGD (optional momentum / L2 weight decay); one step per batch",
    paper="Novack et al. arXiv:2211.15853 (SB SGD); Wang et al. arXiv:2405.20763 (SGD baseline)",
    family="common",
))

__all__ = ["SGD_HPARAMS", "SGD_LR_SPACE"]
