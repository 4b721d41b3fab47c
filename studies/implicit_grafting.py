"""implicit_grafting: large-batch SGD with the step norm of small-batch SGD (grafting) and normalized GD.

Novack et al., "Disentangling the Mechanisms Behind Implicit Regularization in
SGD", ICLR 2023, https://arxiv.org/abs/2211.15853: the seed README's "Grafting
Experiments" table. Large-batch SGD takes its direction from the batch of 5120
and its step norm from a small batch: one random micro-batch of the same step
(iterative grafting), or the gradient norm a small-batch SGD run logged at the
same step (external grafting); normalized GD (NGD) uses a unit step direction.
Cells: {ResNet-18, VGG-16-BN} x {CIFAR-10, CIFAR-100} x {sgd, pseudo_gd,
iter_graft, exter_graft, ngd}; each searches lr around the published eta
(Optuna's first point). Published: test accuracy of the best-validation
checkpoint.

External grafting reads its reference from this study's own results: the
``exter_graft`` cell of a task needs (``Cell.needs``) the ``sgd`` cell of the
same task, which runs first; each exter_graft trial loads the best completed
sgd trial's ``grad/full_norm`` curve from ``curves.parquet`` (the driver
exports it after every cell; see ``regtune.reference``). The paper-scale sgd
cells report every 20 steps, so each report is the mean norm of one 20-step
block, the block external grafting holds it over. No manual download step.
"""

from __future__ import annotations

from studies._cifar import BEST, PAPER_SCALE, SEED, implicit_cell, preparer, resources, smoke_scale
from studies.spec import Study

SOURCE = f"{SEED}, grafting table"
METHODS = ("sgd", "pseudo_gd", "iter_graft", "exter_graft", "ngd")

# task -> eta of each method (METHODS order), published test accuracy % of each
TABLE = {
    "cifar10_resnet18": ((0.1, 0.1, 0.1, 0.1, 0.2626), (92.64, 89.83, 92.12, 92.16, 92.10)),
    "cifar100_resnet18": ((0.1, 0.5, 0.1, 0.1, 0.3951), (71.31, 67.27, 68.30, 68.40, 66.83)),
    "cifar10_vgg16": ((0.05, 0.1, 0.05, 0.05, 0.2388), (89.56, 86.97, 88.65, 89.06, 89.39)),
    "cifar100_vgg16": ((0.1, 0.1, 0.1, 0.1, 0.4322), (64.26, 55.94, 59.71, 63.48, 58.05)),
}

CELLS = tuple(
    implicit_cell(task, method, lr, published={BEST: acc}, source=SOURCE,
                  needs=(f"{task}-sgd",) if method == "exter_graft" else ())
    for task, (lrs, accs) in TABLE.items() for method, lr, acc in zip(METHODS, lrs, accs)
)

STUDY = Study(
    name="implicit_grafting",
    doc="Implicit SGD regularization, grafting table: LB SGD with iterative / external grafting and NGD.",
    paper="Novack et al., Disentangling the Mechanisms Behind Implicit Regularization in SGD, ICLR 2023 "
          "(arXiv:2211.15853), seed README grafting table",
    cells=CELLS,
    scales={"paper": PAPER_SCALE, "smoke": smoke_scale(CELLS)},
    default_scale="paper",
    confirm_full_train=False,  # the paper itself trains on 40000 and picks the checkpoint on the other 10000
    prepare=preparer("cifar10", "cifar100"),
    resources=resources,
    notes="Published values: test accuracy (%) of the best-validation checkpoint (seed README). Grafting and NGD "
          "are not in the public seed code; they follow the paper's definitions. External grafting's reference "
          "is the best completed trial of the same task's sgd cell in this study.",
)
