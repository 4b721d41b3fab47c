"""cpr_cifar100: AdamW vs Adam + rescaling vs AdamCPR on CIFAR-100 with ResNet-18.

Franke et al., "Improving Deep Learning Optimization through Constrained
Parameter Regularization", NeurIPS 2024, https://arxiv.org/abs/2311.09058
(METHODS.md section 1): ResNet-18 (CIFAR stem), batch 128, 20k steps, lr warmup
500 steps then cosine to 0.1 x lr, label smoothing 0.1, random crop (reflect
padding) + flip, betas (0.9, 0.98) -- the ``cifar100_resnet18_cpr`` task's
defaults. Published test accuracy (mean ± std of 3 seeds, lr 1e-3; METHODS.md):
AdamW (weight decay 1e-3) 74.9 ± 0.21, Adam + Rescaling (alpha 0.8) 74.7 ± 0.24,
AdamCPR warm start (s = 1000) 76.6 ± 0.22, AdamCPR dependent (k = 8) 76.4 ± 0.50,
AdamCPR inflection point 76.3 ± 0.15.

Search: lr and each method's regularization knob, log ranges centred on the
published setting (Optuna's first point): weight_decay, rescale_alpha, the
warm-start steps (250..4000: 0.5x..8x the warmup, integers) and the dependent
factor. Kappa-IP has no knob (lr only); it samples R(W) every 50 steps (10% of
the warmup, the paper's choice).

Search, then confirm: the search trains on 40000 training images and selects on
the other 10000 (``regtune.tasks.cifar``); the confirm phase re-runs the best
config with fresh seeds on all 50000, as the paper does, and the report compares
its test accuracy (mean ± std) with the paper's by Welch's t-test.
"""

from __future__ import annotations

from regtune.space import IntUniform, LogUniform
from studies._cifar import FINAL, preparer, resources
from studies.spec import Cell, Published, Scale, Study, published_domain

TASK = "cifar100_resnet18_cpr"
ROW = "ResNet-18/CIFAR-100"
SOURCE = "CPR paper (Franke et al.), CIFAR-100 ResNet-18, mean of 3 seeds"
LR = 1e-3


BETAS = (0.9, 0.98)


def _cell(name: str, method: str, col: str, acc: tuple[str, str], knobs: dict, space: dict, point: dict) -> Cell:
    """``knobs``: the method's fixed settings; ``point``: the published values of the searched ``space``; with
    lr 1e-3 and betas (0.9, 0.98) they are the cell's recipe."""
    return Cell(
        name=name, task=TASK, method=method,
        space={"lr": published_domain(LR), **space},
        recipe={"lr": LR, "betas": BETAS, **knobs, **point},
        published={FINAL: Published(acc[0], SOURCE, metric=FINAL, std=acc[1], n=3)},
        published_config={"lr": LR, **knobs, **point},
        row=ROW, col=col, use_default_space=False,
    )


CELLS = (
    _cell("adamw", "adamw", "AdamW", ("74.9", "0.21"), {},
          {"weight_decay": published_domain(1e-3)}, {"weight_decay": 1e-3}),
    _cell("adam_rescale", "adam_rescale", "Adam + Rescaling", ("74.7", "0.24"), {},
          {"rescale_alpha": published_domain(0.8, 4.0)}, {"rescale_alpha": 0.8}),
    _cell("adamcpr-warm_start", "adamcpr", "AdamCPR warm start", ("76.6", "0.22"), {"kappa_init_method": "warm_start"},
          {"kappa_init_param": IntUniform(250, 4000, log=True)}, {"kappa_init_param": 1000}),
    _cell("adamcpr-dependent", "adamcpr", "AdamCPR dependent", ("76.4", "0.50"), {"kappa_init_method": "dependent"},
          {"kappa_init_param": LogUniform(0.5, 128.0)}, {"kappa_init_param": 8.0}),
    _cell("adamcpr-inflection_point", "adamcpr", "AdamCPR Kappa-IP", ("76.3", "0.15"),
          {"kappa_init_method": "inflection_point", "reg_step_size": 50}, {}, {}),
)

STUDY = Study(
    name="cpr_cifar100",
    doc="CPR on CIFAR-100 / ResNet-18: AdamW vs Adam + rescaling vs AdamCPR (warm start, dependent, Kappa-IP).",
    paper="Franke et al., Constrained Parameter Regularization, NeurIPS 2024 (arXiv:2311.09058), CIFAR-100 results",
    cells=CELLS,
    scales={
        "paper": Scale(num_samples=16, fixed={"size": "paper"},
                       doc="the paper's budget: 20k steps, batch 128, full CIFAR-100; a GPU cluster"),
        "smoke": Scale(num_samples=1, fixed={"size": "smoke", "steps": 4, "eval_every": 2}, grace_fraction=1 / 2,
                       max_failures=0,
                       space={"adamcpr-warm_start": {"kappa_init_param": 2},
                              "adamcpr-inflection_point": {"reg_step_size": 1}},
                       doc="CI-sized: width 1/16, 256 generated images, batch 16, 4 steps (warm start at step 2)"),
    },
    default_scale="paper",
    prepare=preparer("cifar100"),
    resources=resources,
    notes="Published: test accuracy (%) of the final model, mean of 3 seeds at lr 1e-3. The paper's best over its "
          "whole grid: AdamW 75.4, Adam + Rescaling 75.9, AdamCPR warm start 76.6.",
)
