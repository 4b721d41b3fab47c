"""The method registry: name -> optimizer builder, step function, hyperparameters,
default search space and paper reference.

A method is a base optimizer plus optional pieces (a gradient estimator, a
gradient transform, step transforms that wrap the optimizer); each published
combination is one record, composed from parts by ``regtune.compose.compose``
(the parts and their hyperparameters live in ``regtune.parts``).
``register_method`` adds user methods the same way. Every record
declares its hyperparameters (``HParam``) and its default search ranges (data
from ``regtune.space``); ``resolve_config`` merges loop, task and method
defaults with a user config and rejects unknown keys and out-of-range values.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from regtune.space import ConfigError, Domain, HParam, LogUniform, domain_values_ok, suggest, validate_config
from regtune.step import StepFn, standard_step
from regtune.tasks.base import Task, get_task

Builder = Callable[[nn.Module, Mapping[str, Any]], tuple[torch.optim.Optimizer, str]]

CPR_PAPER = "Franke et al., Constrained Parameter Regularization, NeurIPS 2024, arXiv:2311.09058"


@dataclass(frozen=True)
class Method:
    name: str
    build: Builder
    hparams: tuple[HParam, ...]
    space: Mapping[str, Domain]
    doc: str
    paper: str
    family: str
    step: StepFn = standard_step
    check: Callable[[Mapping[str, Any]], None] | None = None  # cross-field validation
    tags: Mapping[str, Any] = field(default_factory=dict)
    # groups of keys of which at most one may be set (not null); a key the user sets replaces the defaults of the
    # other keys of its group (e.g. an absolute ``ire_start`` over a task's default ``ire_start_frac``)
    exclusive: tuple[tuple[str, ...], ...] = ()
    # the parts it is composed of (regtune.compose), innermost first, e.g. ("adam", "cpr", "ire"); () when hand-built
    parts: tuple[str, ...] = ()
    # ctx.extras entries its step reads from earlier cells (e.g. external grafting's reference gradient norms)
    reads: tuple[str, ...] = ()

    @property
    def hparam_map(self) -> dict[str, HParam]:
        return {h.name: h for h in self.hparams}


_METHODS: dict[str, Method] = {}


# modules outside regtune that registered methods (a study file composing its own): a process that lacks a name
# (a Ray trial process started by this one inherits the environment) imports them before it gives up
USER_MODULES_ENV = "REGTUNE_METHOD_MODULES"


def _note_user_module(depth: int = 2) -> None:
    module = sys._getframe(depth).f_globals.get("__name__", "")
    if not module or module == "__main__" or module.split(".")[0] == "regtune":
        return
    known = [m for m in os.environ.get(USER_MODULES_ENV, "").split(",") if m]
    if module not in known:
        os.environ[USER_MODULES_ENV] = ",".join(known + [module])


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry (a name once). A method registered by a module outside ``regtune`` (e.g. a
    study file) is found in other processes too: ``get_method`` imports that module there (see USER_MODULES_ENV);
    one registered in a script's ``__main__`` travels as a record instead (``trainables.get(record)``)."""
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} registered twice")
    hp = method.hparam_map
    for key, domain in method.space.items():
        if key not in hp:
            raise ValueError(f"method {method.name!r}: search space key {key!r} is not a hyperparameter")
        domain_values_ok(domain, hp[key])
    _METHODS[method.name] = method
    _note_user_module()
    return method


def ensure_registered(method: Method) -> Method:
    """The registered record named ``method.name``: ``method`` itself, registered now if the name is new here
    (a record that travelled to another process with its trainable)."""
    _load_builtin()
    return _METHODS[method.name] if method.name in _METHODS else register_method(method)


def _import_user_modules() -> None:
    import importlib

    for module in [m for m in os.environ.get(USER_MODULES_ENV, "").split(",") if m]:
        if module not in sys.modules:
            try:
                importlib.import_module(module)
            except ImportError:
                pass  # not importable here: the name stays unknown and get_method says so


def get_method(name: str) -> Method:
    _load_builtin()
    if name not in _METHODS:
        _import_user_modules()
    if name not in _METHODS:
        raise ConfigError(
            f"unknown method {name!r}{suggest(name, _METHODS)}; known methods: {', '.join(sorted(_METHODS))}"
        )
    return _METHODS[name]


def method_names() -> list[str]:
    _load_builtin()
    return sorted(_METHODS)


def _load_builtin() -> None:
    import regtune.families  # noqa: F401  (registers the built-in methods)


# --------------------------------------------------------------------------
# loop hyperparameters: shared by every method and task
LOOP_HPARAMS: tuple[HParam, ...] = (
    HParam("task", None, "task name (see `python -m studies tasks`)", kind=str),
    HParam("size", "paper", "task size preset (paper, smoke ...)", kind=str),
    HParam("seed", 0, "seed of torch / numpy / random and of the data order", kind=int, low=0),
    HParam("steps", 1000, "optimizer steps of the run (the ASHA budget)", kind=int, low=1),
    HParam("eval_every", 100, "report (and checkpoint) every this many steps", kind=int, low=1),
    HParam("lr_schedule", "constant", "learning-rate schedule", kind=str, choices=("constant", "warmup_cosine")),
    HParam("warmup_steps", 0, "linear warmup steps of warmup_cosine", kind=int, low=0),
    HParam("lr_min_ratio", 0.0, "cosine floor as a share of the peak lr", low=0.0, high=1.0),
    HParam("max_grad_norm", None, "clip the global gradient norm (null: off)", low=0.0, low_open=True, nullable=True),
    HParam("accum_steps", 1, "gradient accumulation: chunks per batch, run one after another", kind=int, low=1),
    HParam("device", "auto", "auto: CUDA when the trial has a GPU, else CPU", kind=str, choices=("auto", "cpu", "cuda")),
    HParam("workers", 1, "data-parallel workers of one trial (Ray Train; one GPU each on a GPU cluster); the"
           " global batch is the same for every count", kind=int, low=1),
    HParam("fail_at_step", None, "fault injection: the process dies once past this step", kind=int, low=1, nullable=True),
)


def resolve_config(method_name: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """Merge defaults (loop <- task <- size preset) with ``config``.

    Raises ``ConfigError`` naming the key, the value and what is allowed.
    """
    method = get_method(method_name)
    if "task" not in config:
        raise ConfigError(f"missing key 'task' for method {method_name!r}")
    task: Task = get_task(config["task"])
    size = config.get("size", "paper")
    if size not in task.sizes:
        raise ConfigError(
            f"size={size!r} is not allowed for task {task.name!r}: expected one of {', '.join(task.sizes)}"
        )
    # a method may re-declare a task key (e.g. batch_size) with its own range
    hparams = {**{h.name: h for h in LOOP_HPARAMS}, **task.hparam_map, **method.hparam_map}
    where = f"method {method_name!r} on task {task.name!r}"
    validate_config(config, hparams, where)  # unknown keys / bad values of the user's own config
    layered: dict[str, Any] = {}
    for defaults in (
        task.loop_defaults,
        task.sizes[size],
    ):
        layered.update({k: v for k, v in defaults.items() if k in hparams})
    _drop_exclusive_defaults(method, layered, config)
    layered.update(config)
    resolved = validate_config(layered, hparams, where)
    if task.finalize is not None:
        task.finalize(resolved, config)
    _check_exclusive(method, resolved, where)
    if method.check is not None:
        method.check(resolved)
    return resolved


def _drop_exclusive_defaults(method: Method, layered: dict[str, Any], config: Mapping[str, Any]) -> None:
    """A key of an exclusive group that the user sets nulls the defaults of the group's other keys."""
    for group in method.exclusive:
        if any(config.get(k) is not None for k in group):
            for k in group:
                if k not in config:
                    layered[k] = None


def _check_exclusive(method: Method, resolved: Mapping[str, Any], where: str) -> None:
    for group in method.exclusive:
        both = [k for k in group if resolved.get(k) is not None]
        if len(both) > 1:
            given = " and ".join(f"{k}={resolved[k]!r}" for k in both)
            raise ConfigError(f"{given} are both set for {where}: set only one of {', '.join(group)}")


# --------------------------------------------------------------------------
# shared hyperparameter declarations (one name, one meaning)
def lr_hp(default: float) -> HParam:
    return HParam("lr", default, "peak learning rate", low=0.0, low_open=True)


BETAS = HParam("betas", (0.9, 0.999), "Adam's (beta1, beta2)", kind=tuple, low=0.0, high=1.0, high_open=True)
EPS = HParam("eps", 1e-8, "Adam's epsilon", low=0.0, low_open=True)
WEIGHT_DECAY = HParam("weight_decay", 0.0, "decoupled weight decay on regularized tensors", low=0.0)
REG_EMBEDDING = HParam("regularize_embedding", False, "regularize nn.Embedding weights too", kind=bool)
ADAM_LR_SPACE = LogUniform(1e-4, 1e-2)


def _adam_kwargs(c: Mapping[str, Any]) -> dict[str, Any]:
    return {"lr": c["lr"], "betas": tuple(c["betas"]), "eps": c["eps"]}
