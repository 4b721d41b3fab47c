"""Compose a method from parts: a base optimizer, wrappers, a gradient estimator and a gradient transform.

A method (``regtune.methods.Method``) is

* a **base** optimizer: ``sgd()`` (momentum, L2 decay), ``plain_sgd()``,
  ``adam()``, ``adamw()``;
* **wrappers** around it, innermost first, each a ``regtune.optim`` wrapper
  that works around any optimizer: ``cpr()`` (the CPR constraint),
  ``rescale()`` (joint-norm rescaling), ``sam()`` (the SAM perturbation),
  ``ire()`` (IRE's amplification);
* an optional **estimator** of the gradient: the micro-batch accumulation
  ``microbatch()`` or a micro-batch penalty ``gn_penalty()``, ``ft_penalty()``,
  ``aj_penalty()``, ``uj_penalty()`` (default: one forward/backward of the batch);
* an optional **transform** of the estimated gradient (it needs a micro-batch
  estimator): ``iter_graft()``, ``exter_graft()``, ``ngd()``.

The built-in parts are in ``regtune.parts``; each declares its hyperparameters
and its default search ranges once. A composed method's hyperparameters and
search space are the union of its parts' (so a key of a part the method does not
have, e.g. ``momentum`` under AdamW, is an unknown key), its cross-field checks
and exclusive groups are its parts', and its optimizer is built with no new
optimizer code::

    from regtune.compose import compose
    from regtune.methods import register_method
    from regtune.parts import adamw, gn_penalty, ire

    register_method(compose("adamw_gn_ire", base=adamw(), wrappers=[ire()], estimator=gn_penalty()))

When two parts declare the same key (``regularize_embedding`` of a base and of
CPR), it is one hyperparameter: the outer part's declaration (default, doc)
wins. Parameter groups: every part may add options to the regularized and the
free group (weight decay from the base, the ``regularize`` flag CPR and
rescaling read); the split is the one of ``regtune.optim.groups``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from regtune.methods import Method, get_method
from regtune.space import Domain, HParam
from regtune.step import StepFn, standard_step

ROLES = ("base", "wrapper", "estimator", "transform")

# base: (model, config, regularized-group options, free-group options) -> (optimizer, summary)
MakeBase = Callable[[nn.Module, Mapping[str, Any], dict[str, Any], dict[str, Any]], tuple[torch.optim.Optimizer, str]]
# wrapper: (optimizer, model, config) -> (wrapped optimizer, one-line description)
Wrap = Callable[[torch.optim.Optimizer, nn.Module, Mapping[str, Any]], tuple[torch.optim.Optimizer, str]]


@dataclass(frozen=True)
class Part:
    """One piece of a method. ``role`` says where it goes; the fields that apply to the role are set."""

    name: str
    role: str
    hparams: tuple[HParam, ...] = ()
    space: Mapping[str, Domain] = field(default_factory=dict)
    doc: str = ""
    paper: str = ""
    label: str = ""  # a short display name ("IRE", "SAM"), for messages and summaries
    check: Callable[[Mapping[str, Any]], None] | None = None
    exclusive: tuple[tuple[str, ...], ...] = ()
    make: MakeBase | None = None  # base
    wrap: Wrap | None = None  # wrapper
    groups: Callable[[Mapping[str, Any]], tuple[dict[str, Any], dict[str, Any]]] | None = None  # wrapper's group options
    pre_step: bool = False  # wrapper: its optimizer has a pre_step hook every step function must call (IRE's mask)
    penalty: str | None = None  # estimator: the micro-batch penalty (None: accumulation only)
    describe: Callable[[Mapping[str, Any]], str] | None = None  # estimator / transform: a summary fragment
    transform: str | None = None  # transform: iter_graft / exter_graft / ngd
    reads: tuple[str, ...] = ()  # ctx.extras keys the step needs (exter_graft's reference norms)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"part {self.name!r}: role={self.role!r} is not allowed: expected one of {ROLES}")
        need = {"base": "make", "wrapper": "wrap"}.get(self.role)
        if need and getattr(self, need) is None:
            raise ValueError(f"part {self.name!r}: a {self.role} part needs {need}=")
        if self.role == "transform" and self.transform is None:
            raise ValueError(f"part {self.name!r}: a transform part needs transform=")
        unknown = sorted(set(self.space) - {h.name for h in self.hparams})
        if unknown:
            raise ValueError(f"part {self.name!r}: search space keys {unknown} are not its hyperparameters")

    @property
    def title(self) -> str:
        return self.label or self.name

    def with_defaults(self, **defaults: Any) -> Part:
        """This part with other defaults for some of its hyperparameters (validated), e.g. ``sgd(momentum=0.9)``."""
        hp = {h.name: h for h in self.hparams}
        for key, value in defaults.items():
            if key not in hp:
                raise ValueError(f"part {self.name!r} has no hyperparameter {key!r}; its hyperparameters:"
                                 f" {', '.join(hp) or 'none'}")
            hp[key].validate(value)
        return replace(self, hparams=tuple(replace(h, default=h.validate(defaults[h.name])) if h.name in defaults
                                           else h for h in self.hparams))


# --------------------------------------------------------------------------
def union_hparams(parts: Sequence[Part]) -> tuple[HParam, ...]:
    """Every part's hyperparameters, first declaration's position, the last declaration's definition."""
    order: dict[str, HParam] = {}
    for part in parts:
        for h in part.hparams:
            order[h.name] = h  # dict keeps the first position, the value is replaced
    return tuple(order.values())


def union_space(parts: Sequence[Part]) -> dict[str, Domain]:
    out: dict[str, Domain] = {}
    for part in parts:
        out.update(part.space)
    return out


def _all_checks(checks: Sequence[Callable[[Mapping[str, Any]], None]]) -> Callable[[Mapping[str, Any]], None] | None:
    if not checks:
        return None

    def check(c: Mapping[str, Any]) -> None:
        for fn in checks:
            fn(c)

    return check


def pre_step_then(inner: StepFn) -> StepFn:
    """A step function that calls the optimizer's ``pre_step`` hook before ``inner`` (``standard_step`` calls it
    itself). The hook is idempotent per step (IRE refreshes its mask at most once a step)."""
    if inner is standard_step:
        return inner

    def step(ctx, batch):
        hook = getattr(ctx.optimizer, "pre_step", None)
        if hook is not None:
            hook(ctx, batch)
        return inner(ctx, batch)

    step.__name__ = getattr(inner, "__name__", "step") + "_with_pre_step"
    return step


def _wrapped_build(inner_build: Callable, wrappers: Sequence[Part], inner_name: str) -> Callable:
    def build(model: nn.Module, c: Mapping[str, Any]):
        opt, summary = inner_build(model, c)
        name = inner_name
        for part in wrappers:
            opt, desc = part.wrap(opt, model, c)
            summary = f"{desc} around {name}: {summary}"
            name = part.title
        return opt, summary

    return build


def compose(
    name: str,
    *,
    base: Part,
    wrappers: Sequence[Part] = (),
    estimator: Part | None = None,
    transform: Part | None = None,
    doc: str | None = None,
    paper: str | None = None,
    family: str = "composed",
) -> Method:
    """The method ``name`` made of ``base``, ``wrappers`` (innermost first), ``estimator`` and ``transform``.

    Returns a record, not registered yet (``regtune.methods.register_method``). Raises ``ValueError`` when a
    part is in the wrong place, a wrapper appears twice, or a transform has no micro-batch estimator.
    """
    wrappers = tuple(wrappers)
    for part, role, where in ([(base, "base", "base")] + [(w, "wrapper", "wrappers") for w in wrappers]
                              + ([(estimator, "estimator", "estimator")] if estimator is not None else [])
                              + ([(transform, "transform", "transform")] if transform is not None else [])):
        if not isinstance(part, Part) or part.role != role:
            got = part.role if isinstance(part, Part) else type(part).__name__
            raise ValueError(f"method {name!r}: {where} takes {role} parts, got {getattr(part, 'name', part)!r}"
                             f" ({got})")
    seen = [w.name for w in wrappers]
    twice = sorted({n for n in seen if seen.count(n) > 1})
    if twice:
        raise ValueError(f"method {name!r}: wrapper {', '.join(twice)} appears twice")
    if transform is not None and estimator is None:
        raise ValueError(f"method {name!r}: transform {transform.name!r} needs a micro-batch estimator"
                         " (estimator=microbatch() or a penalty)")
    parts = (base,) + tuple(p for p in (estimator, transform) if p is not None) + wrappers

    def build_inner(model: nn.Module, c: Mapping[str, Any]):
        reg: dict[str, Any] = {}
        free: dict[str, Any] = {}
        for w in wrappers:
            if w.groups is not None:
                r, f = w.groups(c)
                reg.update(r)
                free.update(f)
        opt, summary = base.make(model, c, reg, free)
        for p in (estimator, transform):
            if p is not None and p.describe is not None:
                summary = f"{summary}; {p.describe(c)}"
        return opt, summary

    if estimator is None:
        step: StepFn = standard_step
    else:
        from regtune.microbatch import make_step

        step = make_step(estimator.penalty, transform.transform if transform is not None else None)
        if any(w.pre_step for w in wrappers):
            step = pre_step_then(step)
    titles = [base.title] + [p.title for p in (estimator, transform) if p is not None]
    auto_doc = " + ".join(titles + [w.title for w in wrappers])
    papers = list(dict.fromkeys(p.paper for p in parts if p.paper))
    return Method(
        name=name,
        build=_wrapped_build(build_inner, wrappers, " + ".join(titles)),
        hparams=union_hparams(parts),
        space=union_space(parts),
        doc=doc or auto_doc,
        paper=paper or ("; ".join(papers) if papers else "composed in regtune"),
        family=family,
        step=step,
        check=_all_checks([p.check for p in parts if p.check is not None]),
        exclusive=tuple(g for p in parts for g in p.exclusive),
        parts=tuple(p.name for p in parts),
        reads=tuple(dict.fromkeys(k for p in parts for k in p.reads)),
    )


def extend(method: Method | str, *wrappers: Part, name: str | None = None, doc: str | None = None,
           paper: str | None = None, family: str | None = None) -> Method:
    """``method`` (a record or a registered name, composed or hand-built) with more wrappers around its optimizer.

    Name: ``<method>_<wrapper>...`` unless given. Raises ``ValueError`` when the method already declares a
    hyperparameter of a new wrapper (e.g. it is IRE-wrapped already).
    """
    base = get_method(method) if isinstance(method, str) else method
    for w in wrappers:
        if not isinstance(w, Part) or w.role != "wrapper":
            raise ValueError(f"extend({base.name!r}): takes wrapper parts, got {getattr(w, 'name', w)!r}")
        clash = sorted({h.name for h in base.hparams} & {h.name for h in w.hparams})
        if clash:
            raise ValueError(f"method {base.name!r} already declares {', '.join(clash)}; it cannot be"
                             f" {w.title}-wrapped again")
    if any(w.groups is not None for w in wrappers):
        raise ValueError(f"extend({base.name!r}): {', '.join(w.name for w in wrappers if w.groups)} needs parameter"
                         " groups of its own; compose the method from parts instead")
    step = pre_step_then(base.step) if any(w.pre_step for w in wrappers) else base.step
    label = "_".join(w.name for w in wrappers)
    papers = "; ".join(w.paper for w in wrappers if w.paper)
    return replace(
        base,
        name=name or f"{base.name}_{label}",
        build=_wrapped_build(base.build, wrappers, base.name),
        hparams=tuple(base.hparams) + union_hparams(wrappers),
        space={**base.space, **union_space(wrappers)},
        doc=doc or f"{base.doc}, with {' + '.join(w.title for w in wrappers)}",
        paper=paper or (f"{papers}; base: {base.paper}" if papers else base.paper),
        family=family or base.family,
        step=step,
        check=_all_checks([f for f in [base.check] + [w.check for w in wrappers] if f is not None]),
        exclusive=tuple(base.exclusive) + tuple(g for w in wrappers for g in w.exclusive),
        parts=tuple(base.parts or (base.name,)) + tuple(w.name for w in wrappers),
    )


__all__ = ["Part", "compose", "extend", "pre_step_then", "union_hparams", "union_space"]
