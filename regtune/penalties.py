"""Micro-batch penalties R_k of the implicit-regularization paper.

Novack, Kaur, Marwah, Garg, Lipton: "Disentangling the Mechanisms Behind
Implicit Regularization in SGD", ICLR 2023, https://arxiv.org/abs/2211.15853
(METHODS.md section 2).

Every penalty is the squared norm of the parameter gradient of a scalar X_k
computed on one micro-batch::

    R_k = || grad_theta X_k ||^2

=================  ==============================================================
``grad_norm``      X_k = L_k, the task loss on true labels
``fisher_trace``   X_k = mean_i CE(f(x_i), y_hat_i), y_hat_i ~ softmax(f(x_i)),
                   sampled fresh, not differentiated (the empirical Fisher trace)
``avg_jacobian``   X_k = sum_c mean_i f_c(x_i)  (sum over classes of the mean logit)
``unit_jacobian``  X_k = mean_i u . f(x_i), u a fresh random unit vector in R^C
=================  ==============================================================

``penalty`` returns R_k with its graph (``torch.autograd.grad(create_graph=True)``),
so ``grad R_k`` is exact (double backward: a Hessian-vector product), never a
finite difference. Randomness (sampled labels, unit vectors) comes from a
``torch.Generator`` so a step is reproducible.

Where we knowingly differ from the seed code: the seed samples Fisher labels
with ``torch.distributions.Categorical`` and unit vectors with the global RNG;
we use Gumbel-max sampling (the same distribution) and ``torch.randn`` from the
method's own generator, both drawn on the CPU so runs on CPU and GPU see the
same draws.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

PENALTIES: tuple[str, ...] = ("grad_norm", "fisher_trace", "avg_jacobian", "unit_jacobian")


def double_backward_attention():
    """Attention that can be differentiated twice: ``F.scaled_dot_product_attention``'s fused CPU/GPU kernels
    (flash, memory-efficient) have no double backward, so a penalty's forward runs the math kernel (the same
    function, written as matmul + softmax). Use around the forward of a step that differentiates a gradient."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def sample_labels(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One label per row drawn from ``softmax(logits)`` (Gumbel-max), without gradient.

    The uniforms are drawn on the CPU from ``generator`` (a CPU generator) and
    moved to the logits' device.
    """
    with torch.no_grad():
        u = torch.rand(logits.shape, generator=generator, dtype=torch.float64)
        u = u.clamp_(min=torch.finfo(torch.float64).tiny, max=1.0 - 1e-16)
        gumbel = -torch.log(-torch.log(u)).to(device=logits.device, dtype=torch.float32)
        return (torch.log_softmax(logits.detach().float(), dim=-1) + gumbel).argmax(dim=-1)


def unit_direction(num_classes: int, generator: torch.Generator | None, *, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A random unit vector in R^C (isotropic: a normalized Gaussian), drawn on the CPU."""
    u = torch.randn(num_classes, generator=generator, dtype=torch.float64)
    return (u / u.norm()).to(device=device, dtype=dtype)


def penalty_target(
    kind: str,
    logits: torch.Tensor,
    loss: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    direction: torch.Tensor | None = None,
) -> torch.Tensor:
    """The scalar X_k whose gradient's squared norm is the penalty ``kind``.

    ``logits``: (m, C) outputs of the micro-batch; ``loss``: the task loss L_k on
    true labels (used by ``grad_norm``). ``direction`` fixes u for
    ``unit_jacobian`` (otherwise drawn from ``generator``).
    """
    if kind == "grad_norm":
        return loss
    if kind == "fisher_trace":
        y_hat = sample_labels(logits, generator)
        return F.cross_entropy(logits, y_hat)
    if kind == "avg_jacobian":
        return logits.mean(dim=0).sum()
    if kind == "unit_jacobian":
        u = direction if direction is not None else unit_direction(
            logits.shape[-1], generator, device=logits.device, dtype=logits.dtype)
        return logits.mean(dim=0) @ u.to(dtype=logits.dtype)
    raise ValueError(f"unknown penalty {kind!r}; known: {', '.join(PENALTIES)}")


def skip_draws(kind: str, logits_shape: tuple[int, ...], generator: torch.Generator | None) -> None:
    """Advance ``generator`` exactly as ``penalty_target(kind, ...)`` on logits of ``logits_shape`` would.

    Data-parallel micro-batch steps (regtune.microbatch) call it for the micro-batches another worker
    computes, so every worker's generator, and the draws of the micro-batches it owns, are the one-process ones.
    """
    if generator is None:
        return
    if kind == "fisher_trace":
        torch.rand(logits_shape, generator=generator, dtype=torch.float64)  # sample_labels' uniforms
    elif kind == "unit_jacobian":
        torch.randn(logits_shape[-1], generator=generator, dtype=torch.float64)  # unit_direction's Gaussian
    elif kind not in PENALTIES:
        raise ValueError(f"unknown penalty {kind!r}; known: {', '.join(PENALTIES)}")


def squared_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_i ||t_i||^2 as a 0-d tensor; differentiable when the inputs are."""
    return sum(t.pow(2).sum() for t in tensors)


def penalty(
    kind: str,
    logits: torch.Tensor,
    loss: torch.Tensor,
    params: Sequence[torch.Tensor],
    generator: torch.Generator | None = None,
    *,
    direction: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``(R_k, grad X_k)``: the penalty with its graph, and the gradient it is the squared norm of.

    Backpropagating R_k (``torch.autograd.grad(R, params)``) gives the exact
    penalty gradient. For ``grad_norm`` the returned gradient is grad L_k itself
    (with graph), so callers can reuse it as the data gradient.
    """
    target = penalty_target(kind, logits, loss, generator, direction=direction)
    grads = torch.autograd.grad(target, params, create_graph=True, materialize_grads=True)
    return squared_norm(grads), grads
