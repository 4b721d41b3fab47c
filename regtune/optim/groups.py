"""Which parameters a method regularizes, made explicit and auditable.

Policy (METHODS.md): weight matrices and conv kernels (``ndim >= 2``) are
regularized; biases and normalization weights are free; ``nn.Embedding``
weights follow ``regularize_embedding``. ``param_groups`` returns optimizer
groups plus a one-line summary that the training loop logs, so a run always
says how many tensors and elements it regularizes (the reference package
silently regularizes nothing when handed ``model.parameters()``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Split:
    regularized: list[tuple[str, nn.Parameter]]
    free: list[tuple[str, nn.Parameter]]

    def summary(self) -> str:
        def count(items):
            return len(items), sum(p.numel() for _, p in items)

        nr, er = count(self.regularized)
        nf, ef = count(self.free)
        return (
            f"regularized {nr} tensors / {er:,} elements; free {nf} tensors / {ef:,} elements"
            f" (regularized: {', '.join(n for n, _ in self.regularized) or '-'})"
        )


def split_parameters(model: nn.Module, *, regularize_embedding: bool) -> Split:
    """Split trainable parameters into regularized and free, by the policy above."""
    embedding_params = {
        id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)
    }
    reg, free = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in embedding_params:
            (reg if regularize_embedding else free).append((name, p))
        elif p.ndim >= 2:
            reg.append((name, p))
        else:
            free.append((name, p))
    return Split(reg, free)


def param_groups(
    model: nn.Module,
    *,
    regularize_embedding: bool,
    regularized: dict[str, Any],
    free: dict[str, Any],
) -> tuple[list[dict[str, Any]], str]:
    """Optimizer groups ``[regularized, free]`` with the given per-group options.

    Empty groups are dropped. Returns ``(groups, summary)``.
    """
    split = split_parameters(model, regularize_embedding=regularize_embedding)
    groups = []
    if split.regularized:
        groups.append({"params": [p for _, p in split.regularized], **regularized})
    if split.free:
        groups.append({"params": [p for _, p in split.free], **free})
    return groups, split.summary()


def decay_param_groups(model: nn.Module, *, weight_decay: float, regularize_embedding: bool):
    """Groups for a decoupled/L2 weight-decay optimizer: ``weight_decay`` on regularized tensors, 0 on free ones."""
    return param_groups(
        model,
        regularize_embedding=regularize_embedding,
        regularized={"weight_decay": weight_decay},
        free={"weight_decay": 0.0},
    )


def cpr_param_groups(model: nn.Module, *, regularize_embedding: bool = False):
    """Groups with the ``regularize`` flag that ``AdamCPR`` and ``AdamRescale`` read."""
    return param_groups(
        model,
        regularize_embedding=regularize_embedding,
        regularized={"regularize": True},
        free={"regularize": False},
    )
