"""A plain Vision Transformer (ViT) for CIFAR (32 px, patch 4) and ImageNet (224 px, patch 16).

Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021,
https://arxiv.org/abs/2010.11929; sizes from Touvron et al. (DeiT,
arXiv:2012.12877): ViT-T width 192, 12 layers, 3 heads (5.4M parameters at
32/4 with 100 classes); ViT-S width 384, 12 layers, 6 heads (ViT-S/16 at 224 px:
22M). The IRE paper (Wang et al., NeurIPS 2024, https://arxiv.org/abs/2405.20763)
trains ViT-T / ViT-S on CIFAR-100 at 32 px with patch 4 (Table 3) and ViT-S/16
on ImageNet (Table 4).

Architecture: conv patch embedding, a class token, learned position
embeddings, pre-LayerNorm blocks (multi-head attention with a qkv bias, GELU
MLP of ``mlp_ratio`` x width), final LayerNorm, a linear head on the class
token. Init as timm's ViT: truncated normal (std 0.02) for linear weights,
class token and position embeddings; zero biases; LayerNorm 1 / 0.

Stochastic depth (``drop_path_rate``, DeiT's 0.1 for ViT-S on ImageNet): the
residual branches of block i are dropped per sample with a probability rising
linearly from 0 (first block) to the rate (last block), as in timm.

Where we knowingly differ: this is our own implementation (the IRE paper's
CIFAR ViT code is not part of its public release); no dropout by default.
The class token and position embeddings are ndim >= 2 tensors, so the
repository's parameter policy (regtune.optim.groups) regularizes them, unlike
timm's ``no_weight_decay`` list.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"vit_dim={dim} is not allowed with vit_heads={heads}: expected a multiple of the heads")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth (Huang et al., 2016): drop a residual branch per sample with probability ``p``, scaling
    the kept ones by 1 / (1 - p). Identity (and no random draw) when ``p`` is 0 or in eval mode."""
    if p <= 0.0 or not training:
        return x
    keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device, dtype=x.dtype).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, drop_path: float = 0.0):
        super().__init__()
        self.drop_path = drop_path
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        h = F.gelu(self.fc1(self.norm2(x)))
        h = F.dropout(self.fc2(h), p=self.dropout, training=self.training)
        return x + drop_path(h, self.drop_path, self.training)


class ViT(nn.Module):
    def __init__(self, *, image_size: int = 32, patch_size: int = 4, num_classes: int = 100, dim: int = 192,
                 depth: int = 12, heads: int = 3, mlp_ratio: float = 4.0, dropout: float = 0.0, in_chans: int = 3,
                 drop_path_rate: float = 0.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"patch size {patch_size} does not divide image size {image_size}")
        n_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, dim))
        rates = [drop_path_rate * i / (depth - 1) for i in range(depth)] if depth > 1 else [drop_path_rate]
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, dropout, rates[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, patches, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


VIT_SIZES = {"tiny": {"dim": 192, "depth": 12, "heads": 3}, "small": {"dim": 384, "depth": 12, "heads": 6}}


def vit_cifar(size: str = "tiny", num_classes: int = 100, **overrides) -> ViT:
    """ViT-T / ViT-S at 32 px with patch 4; ``overrides`` (dim, depth, heads ...) for smoke tests."""
    return ViT(image_size=32, patch_size=4, num_classes=num_classes, **{**VIT_SIZES[size], **overrides})


def vit_s16(num_classes: int = 1000, *, image_size: int = 224, **overrides) -> ViT:
    """ViT-S/16 (224 px, patch 16, width 384, 12 layers, 6 heads)."""
    return ViT(image_size=image_size, patch_size=16, num_classes=num_classes, **{**VIT_SIZES["small"], **overrides})
