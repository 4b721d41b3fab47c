"""Shared pieces of the IRE-paper studies and ``cpr_gpt2``: smoke-data hooks, search ranges, cell builders.

IRE paper: Wang et al., "Improving Generalization and Convergence by Enhancing
Implicit Regularization", NeurIPS 2024, https://arxiv.org/abs/2405.20763
(METHODS.md section 3). Not a study (the module name starts with ``_``).

Smoke data: each study's ``prepare`` hook writes small files in the real
on-disk formats into ``<study dir>/data`` at the ``smoke`` scale (CIFAR
pickles, an ImageFolder tree, token files) and returns ``{"data_dir": ...}``;
the real loaders read them. At other scales the hooks return nothing: trials
read ``$REGTUNE_DATA_DIR``, where ``python -m studies prepare`` made the data sets
once (CIFAR, an ImageNet folder's index, token files); the driver checks them
before Ray starts (``studies.engine.preflight``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from regtune.families.ire import IRE_START_FRAC_SPACE
from regtune.methods import get_method
from studies.engine.preflight import generates_data
from studies.spec import Cell, Published

IRE_PAPER = ("Wang et al., Improving Generalization and Convergence by Enhancing Implicit Regularization, "
             "NeurIPS 2024 (arXiv:2405.20763)")

# default search ranges (STUDIES.md)
# the methods' default ranges, each written once in its family (regtune.families): the IRE studies search them
SGD_LR = get_method("sgd").space["lr"]
ADAM_LR = get_method("adamw").space["lr"]
WEIGHT_DECAY = get_method("adamw").space["weight_decay"]
SAM_RHO = get_method("sam").space["sam_rho"]
IRE_RANK = get_method("sgd_ire").space["ire_rank"]
IRE_PROG = get_method("sgd_ire").space["ire_prog"]
IRE_START_FRAC = IRE_START_FRAC_SPACE  # IRE's start as a share of the budget (the CIFAR reference: 0.35)

# the names the paper's tables use for our methods
# nanoGPT-style AdamW of the language-model studies (lr 6e-4, betas (0.9, 0.95)), every weight decayed but
# norms and biases, the embedding included
LLM_ADAMW = {"lr": 6e-4, "betas": (0.9, 0.95), "regularize_embedding": True}

ROW_NAMES = {"sgd": "SGD", "sgd_ire": "SGD-IRE", "sam": "SAM", "sam_ire": "SAM-IRE", "sam_adamw": "SAM",
             "sam_adamw_ire": "SAM-IRE",
             "adamw": "AdamW", "adamw_ire": "AdamW-IRE"}

PrepareHook = Callable[[Path, str], Mapping[str, Any]]


def _data_root(study_dir: Path) -> Path:
    root = Path(study_dir).resolve() / "data"
    root.mkdir(parents=True, exist_ok=True)
    return root


def cifar_prepare(*kinds: str, n_train: int = 384, n_test: int = 128) -> PrepareHook:
    """At ``smoke``: fake CIFAR files (torchvision's pickles) for ``kinds``; 384 = the smoke split's 256 + 128."""
    @generates_data("smoke")
    def prepare(study_dir: Path, scale: str) -> dict[str, Any]:
        if scale != "smoke":
            return {}
        from regtune.data.cifar import missing_files, write_fake_cifar

        root = _data_root(study_dir)
        for i, kind in enumerate(kinds):
            if missing_files(root, kind):
                write_fake_cifar(root, kind, n_train=n_train, n_test=n_test, seed=i)
        return {"data_dir": str(root)}
    return prepare


def imagenet_prepare() -> PrepareHook:
    """At ``smoke``: a tiny ImageFolder tree (4 classes, 6 train / 2 val images each, PNG and JPEG)."""
    @generates_data("smoke")
    def prepare(study_dir: Path, scale: str) -> dict[str, Any]:
        if scale != "smoke":
            return {}
        from regtune.data.imagenet import write_fake_imagenet

        root = _data_root(study_dir) / "imagenet"
        if not (root / "val").is_dir():
            write_fake_imagenet(root, num_classes=4, train_per_class=6, val_per_class=2, size=40)
        return {"data_dir": str(root)}
    return prepare


def text_prepare(*corpora: str) -> PrepareHook:
    """At ``smoke``: generated text tokenized where the text tasks' smoke size looks (``make_smoke_data``)."""
    @generates_data("smoke")
    def prepare(study_dir: Path, scale: str) -> dict[str, Any]:
        if scale != "smoke":
            return {}
        from regtune.data.synthetic_text import make_smoke_data

        root = _data_root(study_dir)
        make_smoke_data(root, corpora, train_lines=1500, val_lines=200)
        return {"data_dir": str(root)}
    return prepare


def cell(
    task: str,
    method: str,
    col: str,
    *,
    space: Mapping[str, Any],
    point: Mapping[str, Any],
    published: float | str | None = None,
    source: str = "",
    metric: str = "test/accuracy",
    published_config: Mapping[str, Any] | None = None,
    row: str | None = None,
    speedup_baseline: str = "",
    speedup_metric: str = "val/loss",
    speedup_mode: str = "reach_baseline_final",
    published_speedup: float | None = None,
    name: str | None = None,
    recipe: Mapping[str, Any] | None = None,
) -> Cell:
    """A cell (default name ``<task>-<method>``) in row ``ROW_NAMES[method]`` and column ``col`` of the paper's
    table. ``recipe`` and ``point`` together are the cell's recipe (``studies.spec.Cell``): the keys it searches
    are Optuna's first config, the others are fixed; ``published`` is the paper's value of ``metric`` from
    ``source``; ``published_speedup``: the paper's speed-up over ``speedup_baseline`` (same ``source``), which the
    report's speed-up table prints beside ours."""
    pub = {metric: Published(published, source, metric)} if published is not None else {}
    if published_speedup is not None:
        pub["speedup"] = Published(published_speedup, source, "speedup")
    return Cell(
        name=name or cell_name(task, method),
        task=task,
        method=method,
        space=dict(space),
        recipe={**(recipe or {}), **point},
        published=pub,
        published_config=dict(published_config or {}),
        row=row or ROW_NAMES.get(method, method),
        col=col,
        speedup_baseline=speedup_baseline,
        speedup_metric=speedup_metric,
        speedup_mode=speedup_mode,
    )


def cell_name(task: str, method: str) -> str:
    return f"{task}-{method}"


def resources(task: str, scale: str) -> dict[str, float]:
    """The task's request, with one CPU (one torch thread) at ``smoke``: tiny models run fastest on one thread,
    and two threads on a busy 2-core machine are many times slower. GPUs are asked for as the task does."""
    from regtune.tasks.base import get_task

    res = dict(get_task(task).resources)
    if scale == "smoke":
        res["cpu"] = 1
    return res
