"""ResNet-18, CIFAR variant (3x3 stem with stride 1, no max-pool, BatchNorm).

He et al., "Deep Residual Learning for Image Recognition", arXiv:1512.03385; the
CIFAR adaptation used by the implicit-regularization paper (Novack et al.,
arXiv:2211.15853) and the CPR paper (Franke et al., arXiv:2311.09058): the
ImageNet stem (7x7 stride 2 + max-pool) is replaced by one 3x3 stride-1 conv,
so a 32x32 input keeps full resolution in the first stage. Four stages of two
BasicBlocks (64, 128, 256, 512 channels; stride 2 from stage 2 on), 1x1-conv
projection shortcuts with BatchNorm, global average pooling, one linear layer.

``width`` multiplies every channel count (1.0 = the published model; smoke
tests use a small value). PyTorch's default initialization, as the public
CIFAR ResNet code the papers build on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10, width: float = 1.0):
        super().__init__()
        chans = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, chans[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(chans[0])
        layers, in_ch = [], chans[0]
        for i, (n, c) in enumerate(zip(blocks, chans)):
            stage = []
            for j in range(n):
                stage.append(BasicBlock(in_ch, c, stride=2 if (i > 0 and j == 0) else 1))
                in_ch = c
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet18_cifar(num_classes: int = 10, width: float = 1.0) -> ResNetCifar:
    """ResNet-18 for 32x32 inputs; ``width`` scales the channels (1.0: 11.2M parameters for 10 classes)."""
    return ResNetCifar((2, 2, 2, 2), num_classes=num_classes, width=width)
