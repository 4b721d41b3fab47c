"""VGG-11 (no BatchNorm, no dropout) and VGG-16 with BatchNorm, for 32x32 inputs.

Simonyan & Zisserman, arXiv:1409.1556, as used by the implicit-regularization
paper (Novack et al., arXiv:2211.15853):

* ``vgg11_nodropout``: configuration "A" (8 convs, 5 max-pools) without
  BatchNorm, classifier 512-512-512-C without dropout. Conv kernels start from
  N(0, 2 / (9 * out_channels)), conv biases at zero, linear layers with
  PyTorch's default init -- as the seed's ``vgg11_no_dropout``.
* ``vgg16_bn``: configuration "D" with BatchNorm. ``head="imagenet"`` (the
  default) is torchvision's ``vgg16_bn`` exactly: adaptive average pooling to
  7x7 (a 32x32 input reaches it as 1x1, so the pooled map is the 512-vector
  copied 49 times), then 25088-4096-4096-C with dropout 0.5, and torchvision's
  init. The seed called ``torchvision.models.vgg16_bn(num_classes=C)`` on
  CIFAR, so this is the published model; at ``width=1`` its ``state_dict``
  loads into torchvision's and gives identical outputs (tested).
  ``head="cifar"`` is the usual 32-px adaptation (512-512-512-C, no pooling, no
  dropout), offered for new studies, not used by the paper tables.

``width`` multiplies every conv channel count and hidden width (smoke tests).
"""

from __future__ import annotations

import math

import torch
from torch import nn

CFG_A = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
CFG_D = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _w(c: int, width: float) -> int:
    return max(1, round(c * width))


def make_features(cfg: tuple, batch_norm: bool, width: float = 1.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_ch = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        out = _w(v, width)
        layers.append(nn.Conv2d(in_ch, out, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out))
        layers.append(nn.ReLU(inplace=True))
        in_ch = out
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """``features`` -> ``avgpool`` -> flatten -> ``classifier`` (torchvision's module names)."""

    def __init__(self, features: nn.Sequential, avgpool: nn.Module, classifier: nn.Sequential):
        super().__init__()
        self.features = features
        self.avgpool = avgpool
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg11_nodropout(num_classes: int = 10, width: float = 1.0) -> VGG:
    """VGG-11 without BatchNorm and dropout, classifier 512-512-512-C (the seed's ``vgg11_no_dropout``)."""
    features = make_features(CFG_A, batch_norm=False, width=width)
    c = _w(512, width)
    classifier = nn.Sequential(
        nn.Linear(c, c), nn.ReLU(inplace=True),
        nn.Linear(c, c), nn.ReLU(inplace=True),
        nn.Linear(c, num_classes),
    )
    model = VGG(features, nn.Identity(), classifier)
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            n = mod.kernel_size[0] * mod.kernel_size[1] * mod.out_channels
            nn.init.normal_(mod.weight, 0.0, math.sqrt(2.0 / n))
            nn.init.zeros_(mod.bias)
    return model


def vgg16_bn(num_classes: int = 10, width: float = 1.0, head: str = "imagenet", dropout: float = 0.5) -> VGG:
    """VGG-16 with BatchNorm; ``head`` "imagenet" (torchvision's, the seed's) or "cifar" (512-512-512-C)."""
    features = make_features(CFG_D, batch_norm=True, width=width)
    c = _w(512, width)
    if head == "imagenet":
        hidden = _w(4096, width)
        avgpool: nn.Module = nn.AdaptiveAvgPool2d((7, 7))
        classifier = nn.Sequential(
            nn.Linear(c * 7 * 7, hidden), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )
    elif head == "cifar":
        avgpool = nn.Identity()
        classifier = nn.Sequential(
            nn.Linear(c, c), nn.ReLU(True), nn.Linear(c, c), nn.ReLU(True), nn.Linear(c, num_classes))
    else:
        raise ValueError(f"head={head!r} is not allowed: expected 'imagenet' or 'cifar'")
    model = VGG(features, avgpool, classifier)
    for mod in model.modules():  # torchvision's VGG init
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.BatchNorm2d):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, 0.0, 0.01)
            nn.init.zeros_(mod.bias)
    return model
