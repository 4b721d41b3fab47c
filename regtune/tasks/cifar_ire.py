"""CIFAR tasks of the IRE paper: WRN-28-10, ResNet-56 (Table 1) and ViT-T / ViT-S (Table 3).

Wang et al., "Improving Generalization and Convergence by Enhancing Implicit
Regularization", NeurIPS 2024, https://arxiv.org/abs/2405.20763 (METHODS.md
section 3). Tasks: ``cifar10_wrn28_10``, ``cifar100_wrn28_10``,
``cifar10_resnet56``, ``cifar100_resnet56``, ``cifar100_vit_t``,
``cifar100_vit_s``.

Data: the CIFAR pipeline of ``regtune.data.cifar`` / ``regtune.tasks.cifar``
(first 40000 training images train, last 10000 validate and pick the best
checkpoint, the official test set is reported for the last and the best
checkpoint; random crop with zero padding 4 + horizontal flip + normalization).

Table 1 setup (ResNet / WRN tasks): batch 128, 200 epochs, cosine schedule to 0,
label smoothing 0.1 (the task's defaults); the optimizer's (SGD lr 0.1, momentum
0.9, weight decay 5e-4; SAM rho 0.05) is the study's recipe (``studies/ire_cifar.py``).
200 epochs of 40000 images at batch 128 = 62500 steps.

IRE protocol of the reference code (CV/cifar/cifar.py): IRE starts at epoch
70 of 200, i.e. 35% of training: the studies set ``ire_start_frac`` 0.35 (an
absolute ``ire_start`` replaces it; setting both is an error). The reference reports "Best Accuracy", the maximum test
accuracy over epochs: with ``test_every_eval`` (default on) every report also
scores the test split, and ``test/accuracy_max`` is the running maximum
(kept in the checkpoint); ``test/accuracy`` of the last report is the final
accuracy.

Where we knowingly differ: the reference trains on all 50000 training images;
the search holds out 10000 for validation (as every CIFAR task here), which
costs some accuracy for every method alike. The paper size trains 200 epochs
(``epochs``) of the ``n_train`` images it uses: ``steps`` follows ``n_train``
(62500 steps of 40000 images, 78125 of all 50000) unless a config sets
``steps`` itself. The test maximum is taken over the reports
(every 2 epochs at the paper size), not over every epoch. ``sgd``'s
weight decay applies to conv / linear weights only (regtune.optim.groups), not
to BatchNorm parameters and biases.

ViT tasks (Table 3; 32 px, patch 4): METHODS.md gives the architecture, not the
optimizer recipe; the task's defaults are a common ViT-on-CIFAR schedule (5
warmup epochs then cosine, label smoothing 0.1, batch 128, 200 epochs), the
optimizer's (AdamW lr 1e-3, weight decay 0.05; SAM over AdamW: ``sam_adamw``) is the study's
(``studies/ire_vit_cifar100.py``).

On CUDA the forward runs under bf16 autocast (``autocast_bf16``, default on;
BatchNorm and the loss stay in float32); on the CPU it is plain float32.

Sizes: ``paper`` and ``smoke`` (tiny models, 256 / 128 / 128 images written by
``regtune.data.cifar.write_fake_cifar`` into the data dir, 4 steps).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from regtune.models.resnet_cifar56 import resnet56_cifar
from regtune.models.vit import vit_cifar
from regtune.models.wrn import wrn28_10
from regtune.space import ConfigError, HParam
from regtune.tasks.base import Task, maybe_bf16, register_task
from regtune.tasks.cifar import GPU_RESOURCES, CifarInstance, cifar_data, data_hparams

IRE_PAPER = ("Wang et al., Improving Generalization and Convergence by Enhancing Implicit Regularization, "
             "NeurIPS 2024, arXiv:2405.20763")
EPOCH_STEPS = -(-40000 // 128)  # 313 steps per epoch of the 40000 training images at batch 128
PAPER_EPOCHS = 200
PAPER_STEPS = PAPER_EPOCHS * 40000 // 128  # 200 epochs of the 40000 training images

CNN_LOOP = {"steps": PAPER_STEPS, "eval_every": 2 * EPOCH_STEPS, "lr_schedule": "warmup_cosine",
            "warmup_steps": 0, "lr_min_ratio": 0.0}
VIT_LOOP = {**CNN_LOOP, "warmup_steps": 5 * EPOCH_STEPS}
SMOKE_DATA = {"n_train": 256, "n_val": 128, "n_test": 128, "batch_size": 16, "eval_batch_size": 128,
              "steps": 4, "eval_every": 2}


AUTOCAST = HParam("autocast_bf16", True, "bf16 autocast of the forward on CUDA (ignored on CPU)", kind=bool)
EPOCHS = HParam("epochs", None, "train this many epochs of the n_train images: steps = ceil(epochs x n_train /"
                " batch_size), unless the config sets steps itself (null: use steps)", low=0.0, low_open=True,
                nullable=True)
TEST_EVERY_EVAL = HParam("test_every_eval", True, "score the test split at every report too, so test/accuracy_max"
                         " (the best test accuracy over evaluations: IRE Table 1's metric) can be reported", kind=bool)


class AutocastCifarInstance(CifarInstance):
    """``CifarInstance`` whose forward runs under bf16 autocast on CUDA; the loss is taken in float32."""

    def __init__(self, kind: str, make_model, config: Mapping[str, Any], device: torch.device):
        super().__init__(kind, make_model, config, device)
        self.autocast = bool(config["autocast_bf16"]) and device.type == "cuda"
        self.test_every_eval = bool(config["test_every_eval"])  # read by regtune.loop.Run.evaluate

    def forward(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        ctx = maybe_bf16(self.autocast)
        with ctx:
            return model(inputs)

    def criterion(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)


def steps_from_epochs(c: dict[str, Any], user: Mapping[str, Any]) -> None:
    """``steps`` = ``epochs`` of the ``n_train`` training images at ``batch_size`` (rounded up), unless the
    user's config sets ``steps``: the paper size trains 200 epochs of whatever training set it uses."""
    if c.get("epochs") is not None and "steps" not in user:
        c["steps"] = max(1, math.ceil(c["epochs"] * c["n_train"] / c["batch_size"]))


def _model_error(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{key}={value!r} is not allowed: expected {allowed}")


def _wrn(num_classes: int, c: Mapping[str, Any]) -> nn.Module:
    if (c["wrn_depth"] - 4) % 6:
        raise _model_error("wrn_depth", c["wrn_depth"], "6n + 4 (10, 16, 22, 28 ...)")
    return wrn28_10(num_classes, depth=c["wrn_depth"], widen_factor=c["wrn_widen"], width=c["width"])


def _resnet(num_classes: int, c: Mapping[str, Any]) -> nn.Module:
    if (c["resnet_depth"] - 2) % 6:
        raise _model_error("resnet_depth", c["resnet_depth"], "6n + 2 (8, 20, 32, 44, 56 ...)")
    return resnet56_cifar(num_classes, depth=c["resnet_depth"], width=c["width"])


def _vit(size: str):
    def make(num_classes: int, c: Mapping[str, Any]) -> nn.Module:
        if c["vit_dim"] % c["vit_heads"]:
            raise _model_error("vit_dim", c["vit_dim"], f"a multiple of vit_heads={c['vit_heads']}")
        return vit_cifar(size, num_classes, dim=c["vit_dim"], depth=c["vit_depth"], heads=c["vit_heads"])
    return make


WRN_HPARAMS = (
    HParam("wrn_depth", 28, "WRN depth (6n + 4)", kind=int, low=10),
    HParam("wrn_widen", 10, "WRN widening factor k", kind=int, low=1),
)
RESNET_HPARAMS = (HParam("resnet_depth", 56, "ResNet depth (6n + 2)", kind=int, low=8),)


def vit_hparams(dim: int, heads: int) -> tuple[HParam, ...]:
    return (
        HParam("vit_dim", dim, "ViT width", kind=int, low=1),
        HParam("vit_depth", 12, "ViT blocks", kind=int, low=1),
        HParam("vit_heads", heads, "ViT attention heads (must divide vit_dim)", kind=int, low=1),
    )


def _register(name: str, kind: str, make_model, extra: tuple[HParam, ...], doc: str, *, vit: bool,
              smoke: Mapping[str, Any]) -> Task:
    hparams = data_hparams(label_smoothing=0.1)
    if vit:  # the channel multiplier means nothing to a ViT; its size keys are vit_*
        hparams = tuple(h for h in hparams if h.name != "width")
    return register_task(Task(
        name=name,
        build=lambda config, device, _k=kind, _m=make_model: AutocastCifarInstance(_k, _m, config, device),
        hparams=hparams + extra + (AUTOCAST, TEST_EVERY_EVAL, EPOCHS),
        doc=doc,
        paper=IRE_PAPER,
        sizes={"paper": {"epochs": PAPER_EPOCHS}, "smoke": {**SMOKE_DATA, **smoke, "epochs": None}},
        loop_defaults=dict(VIT_LOOP if vit else CNN_LOOP),
        splits=("val", "test"),
        resources=dict(GPU_RESOURCES),
        data=cifar_data(kind),
        finalize=steps_from_epochs,
    ))


WRN_SMOKE = {"wrn_depth": 10, "wrn_widen": 1, "width": 0.5}
RESNET_SMOKE = {"resnet_depth": 8, "width": 0.5}
VIT_SMOKE = {"vit_dim": 32, "vit_depth": 2, "vit_heads": 2, "warmup_steps": 1}

_register("cifar10_wrn28_10", "cifar10", _wrn, WRN_HPARAMS,
          "CIFAR-10, WRN-28-10, SGD recipe of IRE Table 1 (200 epochs, cosine, smoothing 0.1)",
          vit=False, smoke=WRN_SMOKE)
_register("cifar100_wrn28_10", "cifar100", _wrn, WRN_HPARAMS,
          "CIFAR-100, WRN-28-10, SGD recipe of IRE Table 1 (200 epochs, cosine, smoothing 0.1)",
          vit=False, smoke=WRN_SMOKE)
_register("cifar10_resnet56", "cifar10", _resnet, RESNET_HPARAMS,
          "CIFAR-10, ResNet-56 (option-A shortcuts), SGD recipe of IRE Table 1",
          vit=False, smoke=RESNET_SMOKE)
_register("cifar100_resnet56", "cifar100", _resnet, RESNET_HPARAMS,
          "CIFAR-100, ResNet-56 (option-A shortcuts), SGD recipe of IRE Table 1",
          vit=False, smoke=RESNET_SMOKE)
_register("cifar100_vit_t", "cifar100", _vit("tiny"), vit_hparams(192, 3),
          "CIFAR-100, ViT-T (32 px, patch 4, width 192, 12 layers, 3 heads), IRE Table 3",
          vit=True, smoke=VIT_SMOKE)
_register("cifar100_vit_s", "cifar100", _vit("small"), vit_hparams(384, 6),
          "CIFAR-100, ViT-S (32 px, patch 4, width 384, 12 layers, 6 heads), IRE Table 3",
          vit=True, smoke=VIT_SMOKE)
