"""Small post-LN transformer language model for word-level WikiText-2.

IRE paper (Wang et al., NeurIPS 2024, https://arxiv.org/abs/2405.20763),
"Transformer on wikitext-2": 2 post-LN layers, width 128, 8 heads, feed-forward
512, causal LM. The paper's notebook is not public in our seed, so we follow
the PyTorch ``word_language_model`` ``TransformerModel`` it matches in shape:
token embedding scaled by sqrt(d), sinusoidal positions, ``nn.TransformerEncoder``
with post-LN layers (``norm_first=False``, ReLU), an untied linear decoder, the
embedding and decoder initialized U(-0.1, 0.1), decoder bias zero. Dropout is a
parameter (the example's 0.2 by default on the task).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_positions(length: int, d_model: int) -> torch.Tensor:
    """[length, d_model] sinusoidal position table (Vaswani et al.)."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div[: d_model // 2])
    return table


class SmallTransformerLM(nn.Module):
    """Causal LM: embedding -> ``n_layers`` post-LN encoder layers with a causal mask -> linear decoder."""

    def __init__(self, vocab_size: int, *, d_model: int = 128, n_heads: int = 8, d_mlp: int = 512,
                 n_layers: int = 2, dropout: float = 0.2, context: int = 35):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"n_heads={n_heads} must divide d_model={d_model}")
        self.d_model = d_model
        self.embed = nn.Embedding(vocab_size, d_model)
        self.register_buffer("positions", sinusoidal_positions(context, d_model), persistent=False)
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, d_mlp, dropout, batch_first=True, norm_first=False)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.decoder = nn.Linear(d_model, vocab_size)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.positions.shape[0]:
            raise ValueError(f"sequence length {t} exceeds the model's context {self.positions.shape[0]}")
        h = self.drop(self.embed(tokens) * math.sqrt(self.d_model) + self.positions[:t])
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=tokens.device, dtype=h.dtype)
        h = self.encoder(h, mask=mask, is_causal=True)
        return self.decoder(h)
