"""implicit_micro_sweep: the gradient-norm penalty across micro-batch sizes on VGG-11 / CIFAR-10.

Novack et al., "Disentangling the Mechanisms Behind Implicit Regularization in
SGD", ICLR 2023, https://arxiv.org/abs/2211.15853: the seed README's "Sample
Micro-batch Experiments" table. Large-batch SGD (5120) + GN with micro-batches
of 50, 100, 1000 and 2500 examples, against small-batch SGD at eta 0.15 and
0.01 and large-batch SGD at eta 0.01: small micro-batches regularize best. The
seed gives two rows, the test accuracy of the best-validation checkpoint
("best") and of the last one ("final"); the report shows both
(``test/accuracy_best`` and ``test/accuracy``).

Search: lr (and reg_lambda) log-uniform around the published eta (lambda),
Optuna's first point. The two small-batch SGD columns differ only in eta, so
their lr ranges are narrow (a factor 2 each way) and keep the columns apart.
The micro-batch size is fixed per cell; at smoke scale it shrinks with the
batch (32): 2, 4, 16, 24.
"""

from __future__ import annotations

from studies._cifar import BEST, FINAL, MODELS, PAPER_SCALE, SEED, implicit_cell, preparer, resources, smoke_scale
from studies.spec import Study

TASK = "cifar10_vgg11"
SOURCE = f"{SEED}, micro-batch sweep table"

# (cell, method, column, eta, lambda, micro-batch size, best %, final %, smoke micro-batch size)
TABLE = (
    ("sgd-lr0.15", "sgd", "SB SGD (η=0.15)", 0.15, None, None, 78.19, 77.56, None),
    ("sgd-lr0.01", "sgd", "SB SGD (η=0.01)", 0.01, None, None, 75.94, 74.73, None),
    ("pseudo_gd", "pseudo_gd", "LB SGD (η=0.01)", 0.01, None, None, 73.90, 73.60, None),
    ("grad_norm-m50", "grad_norm", "LB + GN (mb size = 50)", 0.01, 0.25, 50, 77.34, 76.57, 2),
    ("grad_norm-m100", "grad_norm", "LB + GN (mb size = 100)", 0.01, 0.5, 100, 77.23, 76.60, 4),
    ("grad_norm-m1000", "grad_norm", "LB + GN (mb size = 1000)", 0.01, 0.5, 1000, 75.73, 75.48, 16),
    ("grad_norm-m2500", "grad_norm", "LB + GN (mb size = 2500)", 0.01, 0.5, 2500, 75.64, 75.36, 24),
)

CELLS = tuple(
    implicit_cell(TASK, method, lr, lam, published={BEST: best, FINAL: final}, source=SOURCE,
                  name=f"{TASK}-{cell}", row=MODELS[TASK], col=col,
                  fixed={"micro_batch_size": m} if m else None, lr_factor=2.0 if method == "sgd" else 10.0)
    for cell, method, col, lr, lam, m, best, final, _ in TABLE
)

STUDY = Study(
    name="implicit_micro_sweep",
    doc="Implicit SGD regularization, micro-batch sweep: VGG-11/CIFAR-10, GN penalty at m = 50, 100, 1000, 2500.",
    paper="Novack et al., Disentangling the Mechanisms Behind Implicit Regularization in SGD, ICLR 2023 "
          "(arXiv:2211.15853), seed README micro-batch sweep table (best and final)",
    cells=CELLS,
    scales={
        "paper": PAPER_SCALE,
        "smoke": smoke_scale(CELLS, {f"{TASK}-{cell}": {"micro_batch_size": sm} for cell, *_rest, sm in TABLE if sm}),
    },
    default_scale="paper",
    confirm_full_train=False,  # the paper itself trains on 40000 and picks the checkpoint on the other 10000
    prepare=preparer("cifar10"),
    resources=resources,
    notes="Published values: test accuracy (%) of the best-validation checkpoint ('best') and of the last "
          "checkpoint ('final'), seed README. Large batch 5120; a micro-batch that does not divide it leaves a "
          "smaller last micro-batch, weighted like the others.",
)
