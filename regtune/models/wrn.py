"""Wide ResNet (WRN-d-k) for CIFAR; WRN-28-10 by default.

Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016,
https://arxiv.org/abs/1605.07146. Used by the IRE paper (Wang et al., NeurIPS
2024, https://arxiv.org/abs/2405.20763, Table 1). Pre-activation basic blocks
(BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3), (depth - 4) / 6 blocks per stage,
channels 16, 16k, 32k, 64k, strides 1, 2, 2, a 1x1 conv shortcut where the
shape changes, final BN-ReLU, global average pooling, linear layer. WRN-28-10
has 36.5M parameters on CIFAR-10. Init as the authors' code: Kaiming-normal
(fan_out) convs, BN weight 1 / bias 0, linear bias 0. ``width`` multiplies every
channel count (smoke tests); ``dropout`` 0 (the IRE / SAM setups use none).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WideBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv1(act)
        out = F.relu(self.bn2(out))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(nn.Module):
    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10, *,
                 dropout: float = 0.0, width: float = 1.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth={depth!r} is not allowed: expected 6n + 4 with n >= 1 (10, 16, 22, 28, 40 ...)")
        if widen_factor < 1:
            raise ValueError(f"widen_factor={widen_factor!r} is not allowed: expected an integer >= 1")
        n = (depth - 4) // 6
        chans = [max(1, round(c * width)) for c in (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)]
        self.conv1 = nn.Conv2d(3, chans[0], 3, stride=1, padding=1, bias=False)
        stages, in_ch = [], chans[0]
        for i, c in enumerate(chans[1:]):
            blocks = []
            for j in range(n):
                blocks.append(WideBlock(in_ch, c, stride=(1 if i == 0 else 2) if j == 0 else 1, dropout=dropout))
                in_ch = c
            stages.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(in_ch)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def wrn28_10(num_classes: int = 10, *, depth: int = 28, widen_factor: int = 10, width: float = 1.0,
             dropout: float = 0.0) -> WideResNet:
    return WideResNet(depth, widen_factor, num_classes, dropout=dropout, width=width)
