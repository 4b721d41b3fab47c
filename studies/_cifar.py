"""Shared pieces of the CIFAR studies: data preparation, trial resources, and cells
of the implicit-regularization paper's tables.

Novack et al., "Disentangling the Mechanisms Behind Implicit Regularization in
SGD", ICLR 2023, https://arxiv.org/abs/2211.15853 (METHODS.md section 2; the
published eta / lambda and test accuracies are the seed README's tables,
``seeds/001_*``). Not a study itself (the name starts with an underscore).

Scales shared by the implicit-regularization studies:

* ``paper``: the published setup (``size`` paper: batch 5120 in micro-batches of
  128, small-batch ``sgd`` at batch 128, 5000 optimizer steps, reports every
  100 steps and every 20 for ``sgd`` (the 20-step blocks external grafting reads).
  CIFAR is read from ``$REGTUNE_DATA_DIR`` (or ``~/.cache/regtune/data``),
  made there once with ``python -m studies prepare --study NAME`` (trials never
  download; the driver checks the data before Ray starts).
* ``smoke``: CI-sized: width 1/16, 256/128/128 generated images per split
  written by ``prepare`` into the study dir, batch 32 in micro-batches of 8
  (``sgd``: batch 8), 4 steps, one trial a cell on one CPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from regtune.data.cifar import missing_files, write_fake_cifar
from regtune.tasks.base import get_task
from studies.engine.preflight import generates_data
from studies.spec import Cell, Published, Scale, cell_keys, published_domain

SMOKE_IMAGES = {"n_train": 384, "n_test": 128}  # the smoke size uses 256 train + 128 val + 128 test


def prepare_cifar(study_dir: Path, scale: str, kinds: tuple[str, ...]) -> dict[str, Any]:
    """Extra fixed config of a CIFAR study: smoke writes small CIFAR files in the real format into the
    study dir; other scales read the real data set (``studies prepare``; checked before Ray starts)."""
    if scale != "smoke":
        return {}
    root = Path(study_dir) / "data"
    for kind in kinds:
        if missing_files(root, kind):
            write_fake_cifar(root, kind, seed=0, **SMOKE_IMAGES)
    return {"data_dir": str(root.resolve())}


def preparer(*kinds: str):
    @generates_data("smoke")
    def prepare(study_dir: Path, scale: str) -> dict[str, Any]:
        return prepare_cifar(study_dir, scale, kinds)

    return prepare


def resources(task: str, scale: str) -> Mapping[str, float]:
    """The task's request ({"cpu": 2, "gpu": 0.25}: four trials share a GPU); smoke trials take one CPU."""
    return {"cpu": 1, "gpu": 0} if scale == "smoke" else dict(get_task(task).resources)


PAPER_SCALE = Scale(num_samples=16, fixed={"size": "paper"}, grace_fraction=1 / 16, reduction_factor=3,
                    doc="the published budget: batch 5120 (micro-batches of 128), 5000 steps, full CIFAR; a GPU "
                        "cluster (4 trials share a GPU)")


# smoke: large batch 32 in micro-batches of 8; the small-batch sgd baseline uses batch = micro-batch
SMOKE_BATCH = {"batch_size": 32, "micro_batch_size": 8}
SMOKE_SGD = {"batch_size": 8}


def smoke_scale(cells: tuple[Cell, ...], space: Mapping[str, Mapping[str, Any]] | None = None,
                num_samples: int = 1) -> Scale:
    """The smoke scale of an implicit study: each cell's smoke batch (where the cell does not fix it), then
    ``space`` (cell name -> entries) over it."""
    per_cell: dict[str, dict[str, Any]] = {}
    for c in cells:
        defaults = SMOKE_SGD if c.method == "sgd" else SMOKE_BATCH
        keys = cell_keys(c)
        per_cell[c.name] = {k: v for k, v in defaults.items() if k in keys and k not in c.space}
    for name, entries in (space or {}).items():
        per_cell.setdefault(name, {}).update(entries)
    return Scale(num_samples=num_samples, fixed={"size": "smoke", "steps": 4, "eval_every": 2},
                 space=per_cell, grace_fraction=1 / 2, max_failures=0,
                 doc="CI-sized: width 1/16, 256 generated images, batch 32 in micro-batches of 8, 4 steps")


# --------------------------------------------------------------------------
# the seed's tables
MODELS = {  # task -> the seed table's row label
    "cifar10_resnet18": "ResNet-18/CIFAR10",
    "cifar100_resnet18": "ResNet-18/CIFAR100",
    "cifar10_vgg11": "VGG-11/CIFAR10",
    "cifar10_vgg16": "VGG-16/CIFAR10",
    "cifar100_vgg16": "VGG-16/CIFAR100",
}
COLUMNS = {  # method -> the seed table's column label
    "sgd": "SB SGD", "pseudo_gd": "LB SGD", "grad_norm": "LB + GN", "fisher_trace": "LB + FT",
    "avg_jacobian": "LB + AJ", "unit_jacobian": "LB + UJ", "iter_graft": "Iterative Grafting",
    "exter_graft": "External Grafting", "ngd": "NGD",
}
# the paper's batches: the small-batch baseline at batch 128 without momentum or weight decay, reporting every
# 20 steps (the 20-step blocks external grafting reads its gradient norms over); the large-batch methods at batch
# 5120 in micro-batches of 128
SGD_RECIPE = {"batch_size": 128, "momentum": 0.0, "weight_decay": 0.0, "eval_every": 20}
LARGE_BATCH_RECIPE = {"batch_size": 5120, "micro_batch_size": 128}
SEED = "seed README (Novack et al.)"
BEST = "test/accuracy_best"  # test accuracy of the best-validation checkpoint, as the seed's eval.py reports
FINAL = "test/accuracy"  # test accuracy of the last checkpoint


def implicit_cell(
    task: str,
    method: str,
    lr: float,
    lam: float | None = None,
    *,
    published: Mapping[str, float],
    source: str,
    name: str | None = None,
    row: str | None = None,
    col: str | None = None,
    fixed: Mapping[str, Any] | None = None,
    lr_factor: float = 10.0,
    needs: tuple[str, ...] = (),
) -> Cell:
    """A cell searching lr (and reg_lambda) around the published eta (lambda), which Optuna tries first.

    ``published``: metric -> published value in percent, as the seed prints it, e.g. {BEST: 92.64}.
    ``fixed``: extra fixed hyperparameters (e.g. ``micro_batch_size``), also part of the published config.
    The cell's recipe: ``point`` (eta, lambda) with the paper's batch (``SGD_RECIPE`` for the small-batch
    baseline, else ``LARGE_BATCH_RECIPE``).
    """
    point: dict[str, Any] = {"lr": lr}
    space: dict[str, Any] = {"lr": published_domain(lr, lr_factor)}
    if lam is not None:
        point["reg_lambda"] = lam
        space["reg_lambda"] = published_domain(lam)
    space.update(fixed or {})
    return Cell(
        name=name or f"{task}-{method}",
        task=task,
        method=method,
        space=space,
        recipe={**(SGD_RECIPE if method == "sgd" else LARGE_BATCH_RECIPE), **point},
        published={m: Published(f"{v:.2f}", source, metric=m) for m, v in published.items()},  # as printed
        published_config={**point, **(fixed or {})},
        row=row or MODELS[task],
        col=col or COLUMNS[method],
        needs=needs,
    )
