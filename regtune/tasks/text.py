"""Language-model tasks of the IRE and CPR papers (causal next-token prediction).

* ``wikitext2_transformer``: IRE paper (Wang et al., NeurIPS 2024,
  https://arxiv.org/abs/2405.20763), small post-LN transformer (2 layers, d 128,
  8 heads, ff 512) on word-level WikiText-2, batch 32, AdamW lr 6e-4, 3000
  warmup steps, cosine to lr/20 at 100k steps; ``adamw_ire`` from step 3000.
* ``wikitext103_llama60m``, ``minipile_llama119m``, ``openwebtext_llama229m``:
  IRE paper's LLaMA pre-training (AdamW betas (0.9, 0.95), wd 0.1, clip 1.0,
  warmup then cosine to lr/20, max lr 6e-4; 50k / 30k / 50k steps; batch 240 /
  300 / 480 sequences of 1024 tokens as in the paper's launch commands).
* ``openwebtext_gpt2s``: CPR paper (Franke et al., NeurIPS 2024,
  https://arxiv.org/abs/2311.09058), GPT-2 small on OpenWebText, 200k steps,
  5k warmup, cosine.

Metric ``val/loss`` (mode min); ``evaluate`` also returns ``val/accuracy``
(next-token) and ``val/perplexity`` = exp(loss). Data: token files made once
by ``regtune.data.text.prepare`` (CLI ``python -m studies prepare``) under
``<data_dir>/<corpus>/<tokenizer>``; the ``smoke`` sizes read generated text
that ``regtune.data.synthetic_text.make_smoke_data(data_dir)`` writes. On CUDA
the forward runs under bf16 autocast (``autocast_bf16``); the loss is computed
in float32. Knowing differences, all marked as our choice: the papers do not
publish the wikitext-2 context (we use 35, the PyTorch word-LM example's bptt),
its dropout (0.2, same example) or clipping, the LLaMA warmup length (we use
1000 steps), the 60M / 119M shapes (see ``regtune.models.hf_lm``), or the
GPT-2 batch size and lr floor (nanoGPT's 480 x 1024 tokens and lr/10). The
paper batch sizes are per optimizer step; they need gradient accumulation on
one GPU, which the training step (not the task) would provide.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from regtune.data.check import Need
from regtune.data.text import TOKENIZERS, eval_starts, load_tokens, token_dir, train_starts, window_batch
from regtune.models.hf_lm import GPT2_SMALL, LLAMA_PRESETS, build_gpt2, build_llama
from regtune.models.small_lm import SmallTransformerLM
from regtune.space import ConfigError, HParam
from regtune.tasks.base import Task, evaluate_batches, maybe_bf16, register_task

IRE_PAPER = ("Wang et al., Improving Generalization and Convergence by Enhancing Implicit Regularization,"
             " NeurIPS 2024, arXiv:2405.20763")
CPR_PAPER = "Franke et al., Constrained Parameter Regularization, NeurIPS 2024, arXiv:2311.09058"


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class TextLMInstance:
    """Token files + model + next-token loss; see ``regtune.tasks.base`` for the contract."""

    def __init__(self, config: Mapping[str, Any], device: torch.device, *, corpus: str, arch: str):
        self.device, self.arch = device, arch
        self.context, self.batch_size, self.seed = config["context"], config["batch_size"], config["seed"]
        directory = token_dir(config["data_dir"], corpus, config["tokenizer"])
        self.data = load_tokens(directory, corpus=corpus, tokenizer=config["tokenizer"])
        data_vocab = self.data.vocab_size
        vocab = config["vocab_size"]
        if vocab is None:
            vocab = data_vocab if arch == "small" else _round_up(data_vocab, 64)  # 50257 -> 50304, as nanoGPT
        if vocab < data_vocab:
            raise ConfigError(f"vocab_size={vocab!r} is not allowed: the {config['tokenizer']} tokens in "
                              f"{directory} need >= {data_vocab}")
        if config["d_model"] % config["n_heads"]:
            raise ConfigError(f"n_heads={config['n_heads']!r} is not allowed: it must divide d_model={config['d_model']}")
        shape = {k: config[k] for k in ("d_model", "n_layers", "n_heads", "d_mlp", "context")}
        if arch == "small":
            model = SmallTransformerLM(vocab, dropout=config["dropout"], **shape)
        elif arch == "llama":
            model = build_llama(vocab_size=vocab, **shape)
        else:
            model = build_gpt2(vocab_size=vocab, dropout=config["dropout"], **shape)
        self.model = model.to(device)
        self.num_classes = vocab
        self.autocast = bool(config["autocast_bf16"]) and device.type == "cuda"
        self.eval_batch_size = config["eval_batch_size"] or self.batch_size
        n_windows = None if config["eval_batches"] is None else config["eval_batches"] * self.eval_batch_size
        self._eval_starts = {split: eval_starts(len(tokens), self.context, n_windows)
                             for split, tokens in self.data.splits.items() if split != "train"}

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x, y

    def train_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.data.splits["train"]
        starts = train_starts(len(tokens), self.context, self.batch_size, self.seed, step)
        return self._to_device(*window_batch(tokens, starts, self.context))

    def forward(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        ctx = maybe_bf16(self.autocast)
        with ctx:
            if self.arch == "small":
                return model(inputs)
            return model(input_ids=inputs).logits

    def criterion(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def eval_batches(self, split: str):
        if split not in self._eval_starts:
            raise ValueError(f"no {split!r} split in {self.data.directory} (have: {', '.join(self._eval_starts)})")
        tokens, starts = self.data.splits[split], self._eval_starts[split]
        for i in range(0, len(starts), self.eval_batch_size):
            yield self._to_device(*window_batch(tokens, starts[i:i + self.eval_batch_size], self.context))

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        out = evaluate_batches(self, model, self.eval_batches(split), split)
        loss = out[f"{split}/loss"]
        out[f"{split}/perplexity"] = math.exp(min(loss, 700.0)) if np.isfinite(loss) else float("inf")
        return out


# --------------------------------------------------------------------------
def _hparams(shape: Mapping[str, int], *, batch_size: int, context: int, tokenizer: str, dropout: float,
             eval_batches: int | None, eval_batch_size: int | None) -> tuple[HParam, ...]:
    return (
        HParam("data_dir", None, "root of the token files (null: $REGTUNE_DATA_DIR or ~/.cache/regtune/data)",
               kind=str, nullable=True),
        HParam("tokenizer", tokenizer, "which prepared tokenization to read: <data_dir>/<corpus>/<tokenizer>",
               kind=str, choices=TOKENIZERS),
        HParam("context", context, "tokens per training window (sequence length)", kind=int, low=1),
        HParam("batch_size", batch_size, "sequences per optimizer step", kind=int, low=1),
        HParam("eval_batch_size", eval_batch_size, "sequences per evaluation batch (null: batch_size)",
               kind=int, low=1, nullable=True),
        HParam("eval_batches", eval_batches, "evaluation batches of fixed windows (null: the whole split)",
               kind=int, low=1, nullable=True),
        HParam("d_model", shape["d_model"], "model width", kind=int, low=1),
        HParam("n_layers", shape["n_layers"], "transformer layers", kind=int, low=1),
        HParam("n_heads", shape["n_heads"], "attention heads (must divide d_model)", kind=int, low=1),
        HParam("d_mlp", shape["d_mlp"], "feed-forward hidden width", kind=int, low=1),
        HParam("vocab_size", None, "model vocabulary (null: the data's, padded to a multiple of 64 for LLaMA/GPT-2)",
               kind=int, low=1, nullable=True),
        HParam("dropout", dropout, "dropout rate (small transformer, GPT-2; LLaMA has none)",
               low=0.0, high=1.0, high_open=True),
        HParam("autocast_bf16", True, "bf16 autocast of the forward on CUDA (ignored on CPU)", kind=bool),
    )


def _data(corpus: str):
    def data(c: Mapping[str, Any]) -> tuple[Need, ...]:  # a window is context + 1 tokens, in train and val
        return (Need(corpus, c["data_dir"], train=c["context"] + 1, held_out=c["context"] + 1,
                     tokenizer=c["tokenizer"]),)
    return data


def _builder(corpus: str, arch: str):
    def build(config: Mapping[str, Any], device: torch.device) -> TextLMInstance:
        return TextLMInstance(config, device, corpus=corpus, arch=arch)
    return build


LLM_RESOURCES = {"cpu": 4, "gpu": 1}  # a 60M-229M model at context 1024 wants a whole GPU
SMALL_RESOURCES = {"cpu": 2, "gpu": 0.25}
SMOKE_LOOP = {"steps": 60, "eval_every": 20, "warmup_steps": 6, "accum_steps": 2}  # smoke exercises accumulation
SMOKE_DATA = {"tokenizer": "local-bpe", "context": 32, "batch_size": 8, "eval_batches": 8, "eval_batch_size": 16}


def _llama_task(name: str, corpus: str, preset: str, *, batch_size: int, accum_steps: int, steps: int,
                doc: str) -> Task:
    shape = LLAMA_PRESETS[preset]
    return register_task(Task(
        name=name,
        build=_builder(corpus, "llama"),
        data=_data(corpus),
        hparams=_hparams(shape, batch_size=batch_size, context=shape["context"], tokenizer="gpt2", dropout=0.0,
                         eval_batches=50, eval_batch_size=16),
        doc=doc,
        paper=IRE_PAPER + " (LLaMA pre-training, 2x speed-up figure)",
        sizes={
            "paper": {},
            "smoke": {**SMOKE_LOOP, **SMOKE_DATA, "d_model": 32, "n_layers": 2, "n_heads": 2, "d_mlp": 64},
        },
        # accum_steps: the paper's per-GPU micro-batch (its --batch_size) x context fits one 80 GB GPU
        loop_defaults={"steps": steps, "eval_every": 1000, "lr_schedule": "warmup_cosine", "warmup_steps": 1000,
                       "lr_min_ratio": 0.05, "max_grad_norm": 1.0, "accum_steps": accum_steps},
        metric="val/loss",
        mode="min",
        resources=dict(LLM_RESOURCES),
    ))


WIKITEXT2_TRANSFORMER = register_task(Task(
    name="wikitext2_transformer",
    build=_builder("wikitext2", "small"),
    data=_data("wikitext2"),
    hparams=_hparams({"d_model": 128, "n_layers": 2, "n_heads": 8, "d_mlp": 512}, batch_size=32, context=35,
                     tokenizer="word", dropout=0.2, eval_batches=None, eval_batch_size=None),
    doc="word-level WikiText-2, 2-layer post-LN transformer (d 128, 8 heads, ff 512), batch 32",
    paper=IRE_PAPER + " (transformer on wikitext-2 figure)",
    sizes={
        "paper": {},
        "smoke": {**SMOKE_LOOP, **SMOKE_DATA, "tokenizer": "word", "batch_size": 16, "d_model": 32, "n_heads": 4,
                  "d_mlp": 64, "dropout": 0.0},
    },
    loop_defaults={"steps": 100_000, "eval_every": 1000, "lr_schedule": "warmup_cosine", "warmup_steps": 3000,
                   "lr_min_ratio": 0.05, "max_grad_norm": 1.0},
    metric="val/loss",
    mode="min",
    resources=dict(SMALL_RESOURCES),
))

WIKITEXT103_LLAMA60M = _llama_task(
    "wikitext103_llama60m", "wikitext103", "llama60m", batch_size=240, accum_steps=6, steps=50_000,
    doc="WikiText-103 (GPT-2 BPE), LLaMA ~60M (59.9M), context 1024, batch 240, 50k steps")
MINIPILE_LLAMA119M = _llama_task(
    "minipile_llama119m", "minipile", "llama119m", batch_size=300, accum_steps=20, steps=30_000,
    doc="MiniPile (GPT-2 BPE), LLaMA ~119M (119.7M), context 1024, batch 300, 30k steps")
OPENWEBTEXT_LLAMA229M = _llama_task(
    "openwebtext_llama229m", "openwebtext", "llama229m", batch_size=480, accum_steps=30, steps=50_000,
    doc="OpenWebText (GPT-2 BPE), LLaMA ~229M (228.3M), context 1024, batch 480, 50k steps")

OPENWEBTEXT_GPT2S = register_task(Task(
    name="openwebtext_gpt2s",
    build=_builder("openwebtext", "gpt2"),
    data=_data("openwebtext"),
    hparams=_hparams(GPT2_SMALL, batch_size=480, context=GPT2_SMALL["context"], tokenizer="gpt2", dropout=0.0,
                     eval_batches=50, eval_batch_size=16),
    doc="OpenWebText (GPT-2 BPE), GPT-2 small (124M), context 1024, batch 480, 200k steps; report perplexity",
    paper=CPR_PAPER + " (GPT-2 small on OpenWebText)",
    sizes={
        "paper": {},
        "smoke": {**SMOKE_LOOP, **SMOKE_DATA, "d_model": 32, "n_layers": 2, "n_heads": 2, "d_mlp": 128},
    },
    loop_defaults={"steps": 200_000, "eval_every": 2000, "lr_schedule": "warmup_cosine", "warmup_steps": 5000,
                   "lr_min_ratio": 0.1, "max_grad_norm": 1.0, "accum_steps": 40},  # 12 sequences a chunk
    metric="val/loss",
    mode="min",
    resources=dict(LLM_RESOURCES),
))
