"""A base class for optimizers that wrap another optimizer (SAM, IRE).

A wrapper is a ``torch.optim.Optimizer`` (so LR schedulers accept it) whose
``param_groups`` and ``defaults`` *are* its base optimizer's: a scheduler that
sets ``lr`` on the wrapper sets it on the base. ``param_groups`` is a property
that always reads through to the base, because ``Optimizer.load_state_dict``
replaces the base's group list with new dicts; a copied reference (the pattern
of davda54/sam) would go stale after a checkpoint restore and the scheduler
would then drive dicts the base no longer reads.

``state_dict()`` is ``{"base": base.state_dict(), <name>: wrapper state}``, except for a
*transparent* wrapper (``transparent = True``: CPR's constraint, norm rescaling), which keeps
all of its state in the base's per-parameter ``state`` and group dicts; its ``state_dict`` is
the base's own, so ``adamcpr`` checkpoints keep the layout of an Adam checkpoint.

A transparent wrapper's ``state`` reads through to the base as well (``opt.state[p]`` is the
base's per-parameter state); other wrappers keep their own (empty) one. ``constraint_summary``
(the report's extra metrics) forwards to the base's.
Wrappers nest: ``IRE(SAM(CPR(torch.optim.Adam(groups))))`` is one optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class OptimizerWrapper(torch.optim.Optimizer):
    """Shares the base optimizer's parameter groups; subclasses define ``step``."""

    wrapper_key = "wrapper"
    transparent = False  # True: every bit of state lives in the base's state / groups (see module docstring)

    def __init__(self, base: torch.optim.Optimizer):
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"{type(self).__name__} wraps a torch.optim.Optimizer, got {type(base).__name__}")
        params = [p for g in base.param_groups for p in g["params"]]
        super().__init__(params, {})  # sets up torch's hook machinery; the groups are dropped below
        self.__dict__.pop("_own_groups", None)
        self.__dict__["base"] = base
        self.defaults = base.defaults

    # param_groups always reads through to the base (see module docstring)
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        base = self.__dict__.get("base")
        return base.param_groups if base is not None else self.__dict__["_own_groups"]

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        base = self.__dict__.get("base")
        if base is not None:
            base.param_groups = value
        else:  # only during Optimizer.__init__
            self.__dict__["_own_groups"] = value

    # a transparent wrapper's state is the base's (torch's Optimizer.__init__ assigns an empty one first)
    @property
    def state(self):  # type: ignore[override]
        base = self.__dict__.get("base")
        return base.state if base is not None and self.transparent else self.__dict__["_own_state"]

    @state.setter
    def state(self, value) -> None:
        base = self.__dict__.get("base")
        if base is not None and self.transparent:
            base.state = value
        else:
            self.__dict__["_own_state"] = value

    @property
    def needs_closure(self) -> bool:
        """A closure passes through to the base (SAM below this wrapper needs one)."""
        return bool(getattr(self.base, "needs_closure", False))

    @property
    def constraint_summary(self):
        """The base's report extras (e.g. AdamCPR's lambda), or None."""
        return getattr(self.base, "constraint_summary", None)

    def base_step(self, closure: Callable[[], Any] | None = None):
        """Step the base: a closure passes through when the base needs one; otherwise it is evaluated
        first (with gradients on), as a torch optimizer does, and the base steps on the fresh gradients."""
        if closure is not None and self.needs_closure:
            return self.base.step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.base.step()
        return loss

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        base = self.__dict__.get("base")
        if base is None:
            super().add_param_group(param_group)
        else:
            base.add_param_group(param_group)

    @property
    def params(self) -> list[nn.Parameter]:
        """Every parameter of the base optimizer, in group order."""
        return [p for g in self.param_groups for p in g["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def pre_step(self, ctx, batch) -> None:
        """Forward the loop's pre-step hook to the base when it has one."""
        hook = getattr(self.base, "pre_step", None)
        if hook is not None:
            hook(ctx, batch)

    # ------------------------------------------------------------------
    def wrapper_state(self) -> dict[str, Any]:
        return {}

    def load_wrapper_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        if self.transparent:
            return self.base.state_dict()
        return {"base": self.base.state_dict(), self.wrapper_key: self.wrapper_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        if self.transparent:
            self.base.load_state_dict(state_dict)
            return
        if "base" not in state_dict or self.wrapper_key not in state_dict:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict expects keys 'base' and {self.wrapper_key!r}, "
                f"got {sorted(state_dict)}"
            )
        self.base.load_state_dict(state_dict["base"])
        self.load_wrapper_state(state_dict[self.wrapper_key])

    # torch's Optimizer pickles only defaults/state/param_groups; a wrapper must keep ``base``
    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base!r})"
