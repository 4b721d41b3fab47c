"""ImageNet tasks of the IRE paper: ``imagenet_resnet50`` (Table 2) and ``imagenet_vit_s`` (Table 4).

Wang et al., "Improving Generalization and Convergence by Enhancing Implicit
Regularization", NeurIPS 2024, https://arxiv.org/abs/2405.20763 (METHODS.md
section 3). Data: an ImageFolder directory (``regtune.data.imagenet``;
``data_dir`` or ``$REGTUNE_DATA_DIR/imagenet`` with ``train/`` and ``val/``);
the validation set is the reported split (top-1 accuracy, ``val/accuracy``).

Models: torchvision's ``resnet50(weights=None)``; ViT-S/16 (``regtune.models.vit``).

Defaults (METHODS.md gives the published numbers, the seed README the ViT
command; the optimizers' settings below are the study's recipe,
``studies/ire_imagenet.py``): ResNet-50 SGD lr 0.1, momentum 0.9, weight decay 1e-4, batch 256, 90
epochs, cosine, label smoothing 0.1, torchvision's random-resized crop + flip
(``augment=basic``). ViT-S/16: the standard DeiT-S recipe (Touvron et al.,
"Training data-efficient image transformers", arXiv:2012.12877), which a
78.7% AdamW baseline needs (crop + flip alone stays far below it): AdamW lr
5e-4 x 1024 / 512 = 1e-3, weight decay 0.05, batch 1024, 300 epochs, cosine to
1e-5, label smoothing 0.1, RandAugment (2 ops, timm's m9 = 27 of torchvision's
30 bins), Mixup 0.8 / CutMix 1.0 (one of them per batch, CutMix with
probability 0.5; soft targets), random erasing 0.25, stochastic depth 0.1
(``augment=deit``, torchvision's transforms v2). Warmup: 30 epochs, the IRE
paper's command (``--warmup-epochs 30``; DeiT uses 5). ViT IRE from epoch 100
with rank 0.2, prog 2 (the seed README's command). SAM on ViT uses the AdamW
base.

Where we knowingly differ: the ResNet-50 recipe is not given in METHODS.md.
From DeiT we leave out repeated augmentation (3 repeats of each image in a
batch), RandAugment's magnitude noise (timm's mstd 0.5) and DeiT's exclusion
of the class token / position embeddings from weight decay (our parameter
policy decays every tensor with ndim >= 2).

On CUDA the forward runs under bf16 autocast (``autocast_bf16``, default on;
the loss stays in float32); on the CPU it is plain float32.

Sizes: ``paper`` and ``smoke`` (32 px images from a tiny generated folder,
narrow ViT, 3 steps, no worker processes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from regtune.data.check import Need
from regtune.data.imagenet import AUGMENTS, ImageFolderData, batch_mixer, mix_batch
from regtune.models.vit import vit_s16
from regtune.space import ConfigError, HParam
from regtune.tasks.base import Task, evaluate_batches, maybe_bf16, register_task

IRE_PAPER = ("Wang et al., Improving Generalization and Convergence by Enhancing Implicit Regularization, "
             "NeurIPS 2024, arXiv:2405.20763")
TRAIN_IMAGES = 1_281_167
GPU_RESOURCES = {"cpu": 8, "gpu": 1}


class ImageNetInstance:
    def __init__(self, make_model, config: Mapping[str, Any], device: torch.device):
        self.data = ImageFolderData(
            config["data_dir"], image_size=config["image_size"], batch_size=config["batch_size"],
            eval_batch_size=config["eval_batch_size"], seed=config["seed"], num_workers=config["num_workers"],
            train_limit=config["train_limit"], val_limit=config["val_limit"], augment=config["augment"],
            randaugment_ops=config["randaugment_ops"], randaugment_magnitude=config["randaugment_magnitude"],
            random_erasing=config["random_erasing"])
        self.device = device
        self.num_classes = self.data.num_classes
        self.seed = config["seed"]
        self.mixer = None if config["augment"] != "deit" else batch_mixer(
            self.num_classes, mixup_alpha=config["mixup_alpha"], cutmix_alpha=config["cutmix_alpha"],
            switch_prob=config["mix_switch_prob"])
        self.label_smoothing = config["label_smoothing"]
        self.autocast = bool(config["autocast_bf16"]) and device.type == "cuda"
        self.model = make_model(self.num_classes, config).to(device)

    def train_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.data.train_batch(step)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.mixer is not None:  # Mixup / CutMix: y becomes class probabilities (soft targets)
            x, y = mix_batch(self.mixer, x, y, self.seed, step)
        return x, y

    def forward(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        ctx = maybe_bf16(self.autocast)
        with ctx:
            return model(inputs)

    def criterion(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy with label smoothing; ``targets`` are class indices or class probabilities (mixed
        batches), smoothed the same way (as DeiT's smoothed Mixup targets)."""
        if targets.is_floating_point():
            targets = targets.float()
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        batches = ((x.to(self.device), y.to(self.device)) for x, y in self.data.eval_batches(split))
        return evaluate_batches(self, model, batches, split)


def _resnet50(num_classes: int, c: Mapping[str, Any]) -> nn.Module:
    import torchvision  # here, not at import: it costs every trial of every task ~1.5 s

    return torchvision.models.resnet50(weights=None, num_classes=num_classes)


def _vit(num_classes: int, c: Mapping[str, Any]) -> nn.Module:
    if c["image_size"] % 16:
        raise ConfigError(f"image_size={c['image_size']!r} is not allowed: expected a multiple of 16 (patch 16)")
    if c["vit_dim"] % c["vit_heads"]:
        raise ConfigError(f"vit_dim={c['vit_dim']!r} is not allowed: expected a multiple of vit_heads")
    return vit_s16(num_classes, image_size=c["image_size"], dim=c["vit_dim"], depth=c["vit_depth"],
                   heads=c["vit_heads"], drop_path_rate=c["drop_path"])


def data_hparams(batch_size: int, augment: str = "basic") -> tuple[HParam, ...]:
    return (
        HParam("data_dir", None, "ImageFolder root with train/ and val/ (null: $REGTUNE_DATA_DIR/imagenet)",
               kind=str, nullable=True),
        HParam("image_size", 224, "training / evaluation crop size in pixels", kind=int, low=16),
        HParam("batch_size", batch_size, "training batch size", kind=int, low=1),
        HParam("eval_batch_size", 250, "evaluation batch size", kind=int, low=1),
        HParam("num_workers", 8, "DataLoader worker processes (0: load in the training process)", kind=int, low=0),
        HParam("train_limit", None, "use this many training images, evenly spaced (null: all)", kind=int, low=1,
               nullable=True),
        HParam("val_limit", None, "use this many validation images, evenly spaced (null: all)", kind=int, low=1,
               nullable=True),
        HParam("label_smoothing", 0.1, "label smoothing of the cross-entropy", low=0.0, high=1.0, high_open=True),
        HParam("autocast_bf16", True, "bf16 autocast of the forward on CUDA (ignored on CPU)", kind=bool),
        HParam("augment", augment, "training augmentation: basic (random-resized crop + flip) or deit (+ RandAugment,"
               " random erasing, Mixup / CutMix)", kind=str, choices=AUGMENTS),
        HParam("randaugment_ops", 2, "deit: RandAugment operations per image", kind=int, low=0),
        HParam("randaugment_magnitude", 27, "deit: RandAugment magnitude on torchvision's 0..30 bins (27 = timm's m9)",
               kind=int, low=0, high=30),
        HParam("random_erasing", 0.25, "deit: probability of erasing a random box (per-pixel noise)", low=0.0,
               high=1.0),
        HParam("mixup_alpha", 0.8, "deit: Mixup's Beta(alpha, alpha) (0: no Mixup)", low=0.0),
        HParam("cutmix_alpha", 1.0, "deit: CutMix's Beta(alpha, alpha) (0: no CutMix)", low=0.0),
        HParam("mix_switch_prob", 0.5, "deit: probability of CutMix (else Mixup) for a batch when both are on",
               low=0.0, high=1.0),
    )


VIT_HPARAMS = (
    HParam("drop_path", 0.1, "stochastic depth: drop rate of the last block's residual branches (linear from 0)",
           low=0.0, high=1.0, high_open=True),
    HParam("vit_dim", 384, "ViT width", kind=int, low=1),
    HParam("vit_depth", 12, "ViT blocks", kind=int, low=1),
    HParam("vit_heads", 6, "ViT attention heads (must divide vit_dim)", kind=int, low=1),
)
SMOKE = {"image_size": 32, "batch_size": 8, "eval_batch_size": 8, "num_workers": 0, "steps": 3, "eval_every": 3}


def _data(c: Mapping[str, Any]) -> tuple[Need, ...]:
    return (Need("imagenet", c["data_dir"], train=c["train_limit"] or 1, held_out=c["val_limit"] or 1),)


def _epochs(n: float, batch: int) -> int:
    return round(n * TRAIN_IMAGES / batch)


register_task(Task(
    name="imagenet_resnet50",
    build=lambda config, device: ImageNetInstance(_resnet50, config, device),
    hparams=data_hparams(256),
    doc="ImageNet-1k, ResNet-50 (torchvision), SGD 90 epochs cosine, IRE Table 2",
    paper=IRE_PAPER,
    sizes={"paper": {}, "smoke": dict(SMOKE)},
    loop_defaults={"steps": _epochs(90, 256), "eval_every": _epochs(1, 256), "lr_schedule": "warmup_cosine",
                   "warmup_steps": 0},
    resources=dict(GPU_RESOURCES),
    data=_data,
))

register_task(Task(
    name="imagenet_vit_s",
    build=lambda config, device: ImageNetInstance(_vit, config, device),
    hparams=data_hparams(1024, augment="deit") + VIT_HPARAMS,
    doc="ImageNet-1k, ViT-S/16, DeiT-S recipe (AdamW 300 epochs, 30 warmup, cosine; RandAugment, Mixup / CutMix,"
        " random erasing, label smoothing 0.1, stochastic depth 0.1), IRE Table 4",
    paper=IRE_PAPER,
    sizes={"paper": {}, "smoke": {**SMOKE, "vit_dim": 32, "vit_depth": 2, "vit_heads": 2, "warmup_steps": 1}},
    loop_defaults={"steps": _epochs(300, 1024), "eval_every": _epochs(1, 1024), "lr_schedule": "warmup_cosine",
                   "warmup_steps": _epochs(30, 1024), "lr_min_ratio": 0.01},  # DeiT's floor: 1e-5 of 1e-3
    resources=dict(GPU_RESOURCES),
    data=_data,
))
