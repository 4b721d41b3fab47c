"""CIFAR-10/100 image classification tasks (ResNet-18, VGG-11, VGG-16).

Two papers:

* Implicit regularization in SGD (Novack et al., ICLR 2023,
  https://arxiv.org/abs/2211.15853, METHODS.md section 2): ``cifar10_resnet18``,
  ``cifar100_resnet18``, ``cifar10_vgg11``, ``cifar10_vgg16``,
  ``cifar100_vgg16``. Plain cross-entropy, constant lr, 5000 optimizer steps.
  Data: first 40000 training images train, last 10000 validate (best
  checkpoint), official test set reported at the end for the last and the best
  checkpoint. Crop (zero padding 4) + flip + normalize. The seed swapped
  validation and test for CIFAR-10; we use one protocol for both datasets.
  The paper's per-method settings (eta / lambda, batch 5120 in micro-batches of
  128, the small-batch baseline) are its studies' recipes (``studies/_cifar.py``).
* CPR (Franke et al., NeurIPS 2024, https://arxiv.org/abs/2311.09058):
  ``cifar100_resnet18_cpr``. Batch 128, 20k steps, 500 warmup steps then
  cosine to 0.1 x lr, label smoothing 0.1, crop with reflect padding + flip
  (the optimizer's settings, e.g. betas (0.9, 0.98), are the study's). Where we knowingly differ: the paper trains on all 50000
  training images; we keep the same 40000/10000 split as above so the best
  checkpoint is chosen on held-out data; ``full_train`` (set by a study's confirm
  phase) trains on all 50000, as the paper does, and the test set is the number to read.

Sizes: ``paper`` (the published setup) and ``smoke`` (width 1/16 of the
channels, 256 train / 128 val / 128 test images, batch 32 in micro-batches of
8, 4 steps). Smoke data comes from ``regtune.data.cifar.write_fake_cifar``
written into the data dir (``data_dir`` or ``$REGTUNE_DATA_DIR``); with
``n_train + n_val`` <= the file's images.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from regtune.data.check import Need
from regtune.data.cifar import CifarData
from regtune.models.resnet_cifar import resnet18_cifar
from regtune.models.vgg import vgg11_nodropout, vgg16_bn
from regtune.space import HParam
from regtune.tasks.base import Task, evaluate_batches, register_task

IMPLICIT_PAPER = "Novack et al., Disentangling the Mechanisms Behind Implicit Regularization in SGD, ICLR 2023, " \
                 "arXiv:2211.15853"
CPR_PAPER = "Franke et al., Constrained Parameter Regularization, NeurIPS 2024, arXiv:2311.09058"
GPU_RESOURCES = {"cpu": 2, "gpu": 0.25}


class CifarInstance:
    """Data on the device + model + loss; implements the TaskInstance contract."""

    def __init__(self, kind: str, make_model: Callable[[int, Mapping[str, Any]], nn.Module],
                 config: Mapping[str, Any], device: torch.device):
        self.data = CifarData(
            kind, data_dir=config["data_dir"], n_train=config["n_train"],
            n_val=config["n_val"], n_test=config["n_test"], device=device, seed=config["seed"],
            augment=config["augment"], padding_mode=config["padding_mode"], full_train=config["full_train"])
        self.num_classes = self.data.num_classes
        self.batch_size = config["batch_size"]
        self.eval_batch_size = config["eval_batch_size"]
        self.label_smoothing = config["label_smoothing"]
        self.model = make_model(self.num_classes, config).to(device)

    def train_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.train_batch(step, self.batch_size)

    def forward(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs)

    def criterion(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        if split not in ("val", "test"):
            raise ValueError(f"CIFAR tasks have splits 'val' and 'test', not {split!r}")
        return evaluate_batches(self, model, self.data.eval_batches(split, self.eval_batch_size), split)


def data_hparams(*, padding_mode: str = "zeros", label_smoothing: float = 0.0) -> tuple[HParam, ...]:
    return (
        HParam("data_dir", None, "CIFAR data dir (null: $REGTUNE_DATA_DIR or ~/.cache/regtune/data)",
               kind=str, nullable=True),
        HParam("n_train", 40000, "training images: the first n_train of the training set", kind=int, low=1),
        HParam("n_val", 10000, "validation images: the last n_val of the training set", kind=int, low=1),
        HParam("full_train", False, "train on the whole training set, as the papers' final runs do (the study's "
               "confirm phase sets it); the val split then overlaps training: report test", kind=bool),
        HParam("n_test", None, "test images: the first n_test of the test set (null: all)", kind=int, low=1,
               nullable=True),
        HParam("batch_size", 128, "training batch size (examples per optimizer step)", kind=int, low=1),
        HParam("eval_batch_size", 1000, "evaluation batch size", kind=int, low=1),
        HParam("width", 1.0, "channel-width multiplier of the model (1: the published model)",
               low=0.0, low_open=True),
        HParam("augment", True, "random crop (pad 4) + horizontal flip", kind=bool),
        HParam("padding_mode", padding_mode, "padding of the random crop", kind=str, choices=("zeros", "reflect")),
        HParam("label_smoothing", label_smoothing, "label smoothing of the cross-entropy", low=0.0, high=1.0,
               high_open=True),
    )


def cifar_data(kind: str) -> Callable[[Mapping[str, Any]], tuple[Need, ...]]:
    """The CIFAR files a config reads (for the driver's check before Ray starts)."""
    def data(c: Mapping[str, Any]) -> tuple[Need, ...]:
        return (Need(kind, c["data_dir"], train=c["n_train"] + c["n_val"], held_out=c["n_test"] or 1),)
    return data


def _resnet18(num_classes: int, c: Mapping[str, Any]) -> nn.Module:
    return resnet18_cifar(num_classes, width=c["width"])


def _vgg11(num_classes: int, c: Mapping[str, Any]) -> nn.Module:
    return vgg11_nodropout(num_classes, width=c["width"])


def _vgg16(num_classes: int, c: Mapping[str, Any]) -> nn.Module:
    return vgg16_bn(num_classes, width=c["width"], head=c["vgg_head"])


VGG_HEAD = HParam("vgg_head", "imagenet", "VGG-16 head: torchvision's (the seed's) or 512-512-512", kind=str,
                  choices=("imagenet", "cifar"))

SMOKE = {"width": 0.0625, "n_train": 256, "n_val": 128, "n_test": 128, "eval_batch_size": 128,
         "steps": 4, "eval_every": 2}
IMPLICIT_LOOP = {"steps": 5000, "eval_every": 100, "lr_schedule": "constant"}


def _implicit_task(name: str, kind: str, make_model, extra: tuple[HParam, ...], doc: str) -> Task:
    return register_task(Task(
        name=name,
        build=lambda config, device, _k=kind, _m=make_model: CifarInstance(_k, _m, config, device),
        hparams=data_hparams() + extra,
        doc=doc,
        paper=IMPLICIT_PAPER,
        sizes={"paper": {}, "smoke": dict(SMOKE)},
        loop_defaults=dict(IMPLICIT_LOOP),
        splits=("val", "test"),
        resources=dict(GPU_RESOURCES),
        data=cifar_data(kind),
    ))


_implicit_task("cifar10_resnet18", "cifar10", _resnet18, (),
               "CIFAR-10, ResNet-18 (CIFAR stem), 40k/10k split, 5000 steps")
_implicit_task("cifar100_resnet18", "cifar100", _resnet18, (),
               "CIFAR-100, ResNet-18 (CIFAR stem), 40k/10k split, 5000 steps")
_implicit_task("cifar10_vgg11", "cifar10", _vgg11, (),
               "CIFAR-10, VGG-11 without BatchNorm/dropout, 40k/10k split, 5000 steps")
_implicit_task("cifar10_vgg16", "cifar10", _vgg16, (VGG_HEAD,), "CIFAR-10, VGG-16-BN (torchvision head), 40k/10k, 5000 steps")
_implicit_task("cifar100_vgg16", "cifar100", _vgg16, (VGG_HEAD,),
               "CIFAR-100, VGG-16-BN (torchvision head), 40k/10k, 5000 steps")


CIFAR100_RESNET18_CPR = register_task(Task(
    name="cifar100_resnet18_cpr",
    build=lambda config, device: CifarInstance("cifar100", _resnet18, config, device),
    hparams=data_hparams(padding_mode="reflect", label_smoothing=0.1),
    doc="CIFAR-100, ResNet-18 (CIFAR stem), batch 128, 20k steps, warmup 500 + cosine to 0.1 lr, smoothing 0.1",
    paper=CPR_PAPER,
    sizes={"paper": {}, "smoke": {**SMOKE, "batch_size": 16, "warmup_steps": 1}},
    loop_defaults={"steps": 20000, "eval_every": 500, "lr_schedule": "warmup_cosine", "warmup_steps": 500,
                   "lr_min_ratio": 0.1},
    splits=("val", "test"),
    resources=dict(GPU_RESOURCES),
    data=cifar_data("cifar100"),
))
