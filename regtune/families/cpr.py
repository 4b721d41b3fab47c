"""CPR-paper methods: ``adamw``, ``adam_rescale`` (Adam + rescaling), ``adamcpr`` (Adam + the CPR constraint).

Franke et al., Constrained Parameter Regularization, NeurIPS 2024,
https://arxiv.org/abs/2311.09058 (see METHODS.md section 1). Composed from the
parts of ``regtune.parts``: ``adamw()``; ``adam()`` wrapped in ``rescale()``;
``adam()`` wrapped in ``cpr()``.
"""

from __future__ import annotations

from regtune.compose import compose
from regtune.methods import CPR_PAPER, register_method
from regtune.parts import adam, adamw, check_cpr, cpr, rescale

check_adamcpr = check_cpr  # the former name

register_method(compose(
    "adamw", base=adamw(),
    doc="AdamW, decoupled weight decay on regularized tensors only",
    paper=CPR_PAPER + " (baseline)",
    family="cpr",
))

register_method(compose(
    "adam_rescale", base=adam(), wrappers=[rescale()],
    doc="Adam + rescaling of the joint weight norm to alpha x init (Omnigrok)",
    paper=CPR_PAPER + " (baseline, from Omnigrok arXiv:2210.01117)",
    family="cpr",
))

register_method(compose(
    "adamcpr", base=adam(), wrappers=[cpr()],
    doc="Adam + Constrained Parameter Regularization",
    paper=CPR_PAPER,
    family="cpr",
))
