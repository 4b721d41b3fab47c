"""SAM: Sharpness-Aware Minimization, plain and adaptive, around any base optimizer.

Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
Generalization", ICLR 2021, https://arxiv.org/abs/2010.01412; adaptive SAM
(ASAM): Kwon et al., ICML 2021, https://arxiv.org/abs/2102.11600. Reference
code: davda54/sam. Used as a baseline and as a base optimizer of IRE (Wang et
al., NeurIPS 2024, https://arxiv.org/abs/2405.20763; METHODS.md section 3).

With g the gradient of the batch loss at w (already in ``p.grad`` when ``step``
is called) and T = |w| elementwise for adaptive SAM (T = 1 otherwise)::

    e      = rho * T^2 g / (||T g|| + 1e-12)     (norm over all parameters)
    g_sam  = grad L(w + e)                      (the closure, one more forward/backward)
    w      <- base_step(w, g_sam)               (w restored exactly before the base step)

The base optimizer's weight decay, momentum and lr apply to ``g_sam`` at ``w``.
The 1e-12 in the denominator is davda54/sam's guard against a zero gradient.

BatchNorm: by default (``bn_second_pass=False``) the second, perturbed forward
pass leaves the running statistics alone (they are saved and restored exactly;
davda54/sam's example sets the BN momentum to 0 for the same effect), so the
statistics see the same batches, once each, as with the base optimizer.

Where we knowingly differ from davda54/sam: ``w`` is restored by copying a saved
tensor (bit-exact), not by subtracting ``e``; one ``rho`` / ``adaptive`` for all
groups. Memory: one parameter-sized buffer (the saved ``w``) beyond the base's state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from regtune.optim.wrapper import OptimizerWrapper

GRAD_NORM_EPS = 1e-12  # davda54/sam


@contextlib.contextmanager
def preserved_bn_stats(model: nn.Module | None) -> Iterator[None]:
    """Run a block without changing any BatchNorm running statistics (restored exactly)."""
    saved = []
    if model is not None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                saved.append((m, [b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)
                                  if b is not None]))
    try:
        yield
    finally:
        with torch.no_grad():
            for m, bufs in saved:
                live = [b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
                for b, old in zip(live, bufs):
                    b.copy_(old)


class SAM(OptimizerWrapper):
    """Sharpness-aware step around ``base``; ``step`` needs a closure that recomputes loss and grads.

    Args:
        base: the optimizer that takes the step (SGD, AdamW ...); its state is untouched by SAM.
        rho: perturbation radius (``sam_rho``); adaptive SAM needs about 10x larger values.
        adaptive: ASAM scaling T = |w| (``sam_adaptive``).
        model: the module whose BatchNorm statistics the second pass must not change.
        bn_second_pass: let the perturbed pass update BatchNorm statistics (``sam_bn_second_pass``).
    """

    wrapper_key = "sam"
    needs_closure = True

    def __init__(
        self,
        base: torch.optim.Optimizer,
        *,
        rho: float = 0.05,
        adaptive: bool = False,
        model: nn.Module | None = None,
        bn_second_pass: bool = False,
    ):
        if not (rho >= 0.0):
            raise ValueError(f"sam_rho={rho!r} is not allowed: expected a number >= 0")
        super().__init__(base)
        self.rho = float(rho)
        self.adaptive = bool(adaptive)
        self.bn_second_pass = bool(bn_second_pass)
        self.__dict__["_model"] = model
        self._saved_w: dict[nn.Parameter, torch.Tensor] = {}

    @torch.no_grad()
    def perturbation_scale(self, params: list[torch.Tensor]) -> torch.Tensor:
        """rho / (||T g|| + eps), the scalar that multiplies T^2 g."""
        device = params[0].device
        norms = [((p.abs() * p.grad) if self.adaptive else p.grad).norm(2).to(device) for p in params]
        return self.rho / (torch.linalg.vector_norm(torch.stack(norms)) + GRAD_NORM_EPS)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):  # type: ignore[override]
        if closure is None:
            raise RuntimeError("SAM.step needs a closure that recomputes the loss and the gradients")
        params = [p for p in self.params if p.grad is not None]
        if not params:
            return self.base.step()
        scale = self.perturbation_scale(params)
        for p in params:
            w = self._saved_w.get(p)
            if w is None or w.shape != p.shape:
                w = self._saved_w[p] = torch.empty_like(p)
            w.copy_(p)
            e = p.grad * scale.to(p.dtype)
            if self.adaptive:
                e.mul_(p).mul_(p)
            p.add_(e)  # climb to w + e
        bn_guard = contextlib.nullcontext() if self.bn_second_pass else preserved_bn_stats(self.__dict__["_model"])
        with torch.enable_grad(), bn_guard:
            loss = closure()  # gradient at w + e
        for p in params:
            p.copy_(self._saved_w[p])  # back to w, bit-exact
        self.base.step()
        return loss

    def wrapper_state(self) -> dict[str, Any]:
        return {"rho": self.rho, "adaptive": self.adaptive}

    def load_wrapper_state(self, state: dict[str, Any]) -> None:
        pass  # rho / adaptive come from the config; the saved values are informative only
