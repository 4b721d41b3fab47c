"""A base class for optimizers that wrap another optimizer (SAM, IRE).

A wrapper is a ``torch.optim.Optimizer`` (so LR schedulers accept it) whose
``param_groups`` and ``defaults`` *are* its base optimizer's: a scheduler that
sets ``lr`` on the wrapper sets it on the base. ``param_groups`` is a property
that always reads through to the base, because ``Optimizer.load_state_dict``
replaces the base's group list with new dicts; a copied reference (the pattern
of davda54/sam) would go stale after a checkpoint restore and the scheduler
would then drive dicts the base no longer reads.

``state_dict()`` is ``{"base": base.state_dict(), <name>: wrapper state}``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class OptimizerWrapper(torch.optim.Optimizer):
    """Shares the base optimizer's parameter groups; subclasses define ``step``."""

    wrapper_key = "wrapper"

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
        return {"base": self.base.state_dict(), self.wrapper_key: self.wrapper_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
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
