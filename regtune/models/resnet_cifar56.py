"""ResNet-56 (and any ResNet-(6n+2)) for CIFAR, as in He et al. section 4.2.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016,
https://arxiv.org/abs/1512.03385. Used by the IRE paper (Wang et al., NeurIPS
2024, https://arxiv.org/abs/2405.20763, Table 1). A 3x3 conv with 16 channels,
three stages of n basic blocks (16, 32, 64 channels; stride 2 at the start of
stages 2 and 3), global average pooling, one linear layer; depth = 6n + 2
(n = 9: ResNet-56, 0.85M parameters on CIFAR-10).

Shortcuts are the paper's option A: identity, with a stride-2 subsampling and
zero-padded extra channels where the shape changes (no parameters), as in the
widely used public CIFAR ResNet code; Kaiming-normal init of convs and the
linear layer. ``width`` multiplies every channel count (smoke tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad channels to ``out_ch``."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.stride, self.extra = stride, out_ch - in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        lo = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, lo, self.extra - lo))


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = PadShortcut(in_ch, out_ch, stride) if (stride != 1 or in_ch != out_ch) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifarDeep(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs."""

    def __init__(self, depth: int = 56, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth={depth!r} is not allowed: expected 6n + 2 with n >= 1 (20, 32, 44, 56, 110 ...)")
        n = (depth - 2) // 6
        chans = [max(1, round(c * width)) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(3, chans[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(chans[0])
        stages, in_ch = [], chans[0]
        for i, c in enumerate(chans):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_ch, c, stride=2 if (i > 0 and j == 0) else 1))
                in_ch = c
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet56_cifar(num_classes: int = 10, *, depth: int = 56, width: float = 1.0) -> ResNetCifarDeep:
    return ResNetCifarDeep(depth=depth, num_classes=num_classes, width=width)
