"""LLaMA and GPT-2 language models built from Hugging Face configs (random init, no weights downloaded).

IRE paper (Wang et al., NeurIPS 2024, https://arxiv.org/abs/2405.20763) trains
LLaMA models of ~60M, ~119M and ~229M parameters; only the 229M config is
published (``LlamaConfig`` hidden 768, 16 layers, 12 heads, intermediate 3072,
vocabulary 50304, context 1024). The CPR paper (Franke et al., NeurIPS 2024,
https://arxiv.org/abs/2311.09058) trains GPT-2 small (124M) on OpenWebText.

Our 60M / 119M shapes (the paper gives only the totals) keep the GPT-2
vocabulary padded to 50304 (the LLaMA runs use GPT-2-tokenized corpora, as the
229M one does) and SwiGLU width 8/3 x hidden. Counts (``count_parameters`` on
the meta device, equal to ``llama_param_formula``):

=========  ======  ======  =====  ============  ======  =============
preset     hidden  layers  heads  intermediate  vocab   parameters
=========  ======  ======  =====  ============  ======  =============
llama60m   384     12      6      1024          50304   59,876,736
llama119m  768     6       12     2048          50304   119,744,256
llama229m  768     16      12     3072          50304   228,287,232
gpt2s      768     12      12     3072 (4x)     50304   124,475,904
=========  ======  ======  =====  ============  ======  =============

(untied input/output embeddings for LLaMA, tied for GPT-2; the LLaMA totals
are embedding-heavy: 2 x 50304 x hidden of them are the two embeddings.)
``transformers`` is imported lazily so importing the task registry stays fast.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

LLAMA_PRESETS: dict[str, dict[str, int]] = {
    "llama60m": {"d_model": 384, "n_layers": 12, "n_heads": 6, "d_mlp": 1024, "vocab_size": 50304, "context": 1024},
    "llama119m": {"d_model": 768, "n_layers": 6, "n_heads": 12, "d_mlp": 2048, "vocab_size": 50304, "context": 1024},
    "llama229m": {"d_model": 768, "n_layers": 16, "n_heads": 12, "d_mlp": 3072, "vocab_size": 50304, "context": 1024},
}
GPT2_SMALL = {"d_model": 768, "n_layers": 12, "n_heads": 12, "d_mlp": 3072, "vocab_size": 50304, "context": 1024}


def llama_config(*, d_model: int, n_layers: int, n_heads: int, d_mlp: int, vocab_size: int, context: int) -> Any:
    """A ``transformers.LlamaConfig`` (untied embeddings, no biases, RMSNorm, RoPE)."""
    from transformers import LlamaConfig

    if d_model % n_heads:
        raise ValueError(f"n_heads={n_heads} must divide d_model={d_model}")
    return LlamaConfig(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_mlp,
                       num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_heads,
                       max_position_embeddings=context, tie_word_embeddings=False, use_cache=False)


def gpt2_config(*, d_model: int, n_layers: int, n_heads: int, d_mlp: int, vocab_size: int, context: int,
                dropout: float = 0.0) -> Any:
    """A ``transformers.GPT2Config`` (tied embeddings, learned positions, GELU MLP of width ``d_mlp``)."""
    from transformers import GPT2Config

    if d_model % n_heads:
        raise ValueError(f"n_heads={n_heads} must divide d_model={d_model}")
    return GPT2Config(vocab_size=vocab_size, n_positions=context, n_embd=d_model, n_layer=n_layers, n_head=n_heads,
                      n_inner=d_mlp, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, use_cache=False,
                      bos_token_id=None, eos_token_id=None)  # generation-only ids; unused here


def build_llama(**shape: int) -> nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(llama_config(**shape))


def build_gpt2(*, dropout: float = 0.0, **shape: int) -> nn.Module:
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel(gpt2_config(dropout=dropout, **shape))


def count_parameters(builder, **shape: Any) -> int:
    """Parameter count of ``builder(**shape)`` built on the meta device (no memory allocated)."""
    with torch.device("meta"):
        model = builder(**shape)
    return sum(p.numel() for p in model.parameters())


def llama_param_formula(*, d_model: int, n_layers: int, d_mlp: int, vocab_size: int, **_: Any) -> int:
    """2 V h (untied embeddings) + L (4 h^2 attention + 3 h I SwiGLU + 2 h norms) + h (final norm)."""
    h = d_model
    return 2 * vocab_size * h + n_layers * (4 * h * h + 3 * h * d_mlp + 2 * h) + h


def gpt2_param_formula(*, d_model: int, n_layers: int, d_mlp: int, vocab_size: int, context: int, **_: Any) -> int:
    """V h + T h (tied embeddings, positions) + L (4 h^2 + 4 h + 2 h I + I + h + 4 h) + 2 h."""
    h = d_model
    per_layer = (3 * h * h + 3 * h) + (h * h + h) + (h * d_mlp + d_mlp) + (d_mlp * h + h) + 4 * h
    return vocab_size * h + context * h + n_layers * per_layer + 2 * h
