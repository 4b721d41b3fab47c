"""Grokking on modular addition, as in the CPR paper's grokking experiment.

Franke et al., NeurIPS 2024, https://arxiv.org/abs/2311.09058 (setup of
Nanda et al., arXiv:2301.05217). (x + y) mod p with p = 113: inputs
``[x, y, "="]`` where "=" is token p (vocabulary p + 1); all p^2 pairs, 30% for
training (split seed 1, independent of the run seed), 70% for validation.
Batch 512, about 8000 steps (1000 epochs), no schedule. Model: one decoder
block, d 128, 4 heads, attention without bias and with a causal mask, ReLU MLP
128-512-128, no LayerNorm, token + learned positional embeddings, unembedding
without bias; the loss is on the last position. Every tensor with ndim >= 2 is
drawn from N(0, std = 1/sqrt(d)); 1-D tensors start at zero.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from regtune.space import HParam
from regtune.tasks.base import Task, evaluate_batches, register_task

SPLIT_SEED = 1  # the paper's data split seed, fixed for every run


class GrokkingTransformer(nn.Module):
    def __init__(self, vocab: int, d_model: int, n_heads: int, d_mlp: int, seq_len: int = 3):
        super().__init__()
        self.n_heads = n_heads
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.mlp_in = nn.Linear(d_model, d_mlp)
        self.mlp_out = nn.Linear(d_mlp, d_model)
        self.unembed = nn.Linear(d_model, vocab - 1, bias=False)  # answers are 0..p-1
        std = 1.0 / math.sqrt(d_model)
        for p in self.parameters():
            if p.ndim >= 2:
                nn.init.normal_(p, mean=0.0, std=std)
            else:
                nn.init.zeros_(p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, t = tokens.shape
        h = self.tok(tokens) + self.pos.weight[:t]
        q, k, v = self.qkv(h).view(b, t, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.out(att.transpose(1, 2).reshape(b, t, -1))
        h = h + self.mlp_out(F.relu(self.mlp_in(h)))
        return self.unembed(h[:, -1])


def modular_addition_split(p: int, train_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """All (x, y) pairs as ``[x, y, p]`` rows with label (x + y) mod p, split by SPLIT_SEED."""
    x, y = torch.cartesian_prod(torch.arange(p), torch.arange(p)).unbind(1)
    inputs = torch.stack([x, y, torch.full_like(x, p)], dim=1)
    labels = (x + y) % p
    perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_train = int(round(train_fraction * p * p))
    return (inputs[perm], labels[perm]), n_train


class GrokkingInstance:
    def __init__(self, config: Mapping[str, Any], device: torch.device):
        p = config["modulus"]
        (inputs, labels), n_train = modular_addition_split(p, config["train_fraction"])
        self.train_x, self.train_y = inputs[:n_train].to(device), labels[:n_train].to(device)
        self.val_x, self.val_y = inputs[n_train:].to(device), labels[n_train:].to(device)
        self.batch_size = min(config["batch_size"], n_train)
        self.seed = config["seed"]
        self.num_classes = p
        self.model = GrokkingTransformer(p + 1, config["d_model"], config["n_heads"], config["d_mlp"]).to(device)
        self._epoch, self._perm = -1, None

    def train_batch(self, step: int):
        n = self.train_x.shape[0]
        per_epoch = math.ceil(n / self.batch_size)
        epoch, i = divmod(step, per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(n, generator=g).to(self.train_x.device)
        idx = self._perm[i * self.batch_size:(i + 1) * self.batch_size]
        return self.train_x[idx], self.train_y[idx]

    def forward(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs)

    def criterion(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets)

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        if split != "val":
            raise ValueError(f"grokking has no {split!r} split")
        return evaluate_batches(self, model, [(self.val_x, self.val_y)], split)


GROKKING = register_task(Task(
    name="grokking",
    build=GrokkingInstance,
    hparams=(
        HParam("modulus", 113, "p of (x + y) mod p", kind=int, low=2),
        HParam("train_fraction", 0.3, "share of all pairs used for training", low=0.0, high=1.0, low_open=True, high_open=True),
        HParam("batch_size", 512, "training batch size", kind=int, low=1),
        HParam("d_model", 128, "transformer width", kind=int, low=1),
        HParam("n_heads", 4, "attention heads (must divide d_model)", kind=int, low=1),
        HParam("d_mlp", 512, "MLP hidden width", kind=int, low=1),
    ),
    doc="modular addition (x + y) mod 113, 1-layer transformer, 30% train",
    paper="CPR paper, grokking figure (Franke et al., arXiv:2311.09058)",
    sizes={
        "paper": {},
        # CI-sized: a smaller modulus and a narrower model still grok quickly
        "smoke": {"modulus": 31, "train_fraction": 0.5, "d_model": 64, "d_mlp": 128, "batch_size": 128},
    },
    loop_defaults={"steps": 8000, "eval_every": 100},
))
