"""implicit_large_micro: micro-batch penalties with large micro-batches.

Novack et al., "Disentangling the Mechanisms Behind Implicit Regularization in
SGD", ICLR 2023, https://arxiv.org/abs/2211.15853: the seed README's "Large
Micro-batch Experiments" table (pivoted: one row per experiment, one column).
With micro-batches of 1000-2560 examples (2-5 per large batch of 5120) the
gradient-norm and Fisher-trace penalties lose most of their benefit: the
regularizer needs small micro-batches. Cells: ResNet-18/CIFAR-10 + GN (m 2560),
ResNet-18/CIFAR-100 + FT (m 2560), VGG-11/CIFAR-10 + GN (m 1000 and m 2500).
Each searches lr and reg_lambda around the published eta / lambda (Optuna's
first point); the micro-batch size is fixed per cell. Published: test accuracy
of the best-validation checkpoint.

At smoke scale the micro-batch sizes shrink with the batch (32): 16, 16, 16, 24.
"""

from __future__ import annotations

from studies._cifar import BEST, MODELS, PAPER_SCALE, SEED, implicit_cell, preparer, resources, smoke_scale
from studies.spec import Study

SOURCE = f"{SEED}, large micro-batch table"
COLUMN = "Test Accuracy"

# (task, method, label, micro-batch size, eta, lambda, published test accuracy %, smoke micro-batch size)
TABLE = (
    ("cifar10_resnet18", "grad_norm", "LB + GN (mb size=2560)", 2560, 0.5, 0.0025, 65.09, 16),
    ("cifar100_resnet18", "fisher_trace", "LB + FT (mb size=2560)", 2560, 0.1, 0.01, 64.89, 16),
    ("cifar10_vgg11", "grad_norm", "LB + GN (mb size=1000)", 1000, 0.01, 0.25, 75.07, 16),
    ("cifar10_vgg11", "grad_norm", "LB + GN (mb size=2500)", 2500, 0.01, 0.25, 75.21, 24),
)


def _name(task: str, method: str, m: int) -> str:
    return f"{task}-{method}-m{m}"


CELLS = tuple(
    implicit_cell(task, method, lr, lam, published={BEST: acc}, source=SOURCE, name=_name(task, method, m),
                  row=f"{MODELS[task]}, {label}", col=COLUMN, fixed={"micro_batch_size": m})
    for task, method, label, m, lr, lam, acc, _ in TABLE
)

STUDY = Study(
    name="implicit_large_micro",
    doc="Implicit SGD regularization, large micro-batch table: GN / FT penalties with micro-batches of 1000-2560.",
    paper="Novack et al., Disentangling the Mechanisms Behind Implicit Regularization in SGD, ICLR 2023 "
          "(arXiv:2211.15853), seed README large micro-batch table",
    cells=CELLS,
    scales={
        "paper": PAPER_SCALE,
        "smoke": smoke_scale(CELLS, {_name(t, me, m): {"micro_batch_size": sm} for t, me, _, m, *_rest, sm in TABLE}),
    },
    default_scale="paper",
    confirm_full_train=False,  # the paper itself trains on 40000 and picks the checkpoint on the other 10000
    prepare=preparer("cifar10", "cifar100"),
    resources=resources,
    notes="Published values: test accuracy (%) of the best-validation checkpoint (seed README). Large batch 5120; "
          "a micro-batch of 2500 splits it into 3 micro-batches (2500, 2500, 120), each weighted 1/3.",
)
