"""Declarative study specs: a study is a table.

A ``Study`` lists its ``Cell``s (task x method, each searched by its own Optuna
and scheduled by its own ASHA; the cells of a stage share one Tune experiment,
see ``studies.engine.stage``), its ``Scale`` presets (``paper``,
``smoke`` ...), and the published numbers the report prints beside ours.
Search spaces are ``regtune.space`` domains (or fixed values) that narrow the
method's defaults; a cell may never invent keys (checked by ``check_study``
before Ray starts).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from regtune.methods import LOOP_HPARAMS, get_method, resolve_config
from regtune.report_speedup import MODES as SPEEDUP_MODES
from regtune.space import Choice, ConfigError, Domain, IntUniform, LogUniform, Uniform, suggest
from regtune.tasks.base import get_task


@dataclass(frozen=True)
class Published:
    """A published number. ``value`` may be given as the text the paper prints (``"96.70"``): ``text`` keeps it,
    so the report shows it exactly as published. ``std``: the paper's ± (over ``n`` seeds), where it gives one."""

    value: float
    source: str  # e.g. "seed README, main table" or "CPR paper Fig. 3"
    metric: str = "test/accuracy"
    std: float | None = None  # also as printed: "0.50"
    n: int | None = None  # seeds behind the published mean (and std)
    text: str = ""  # the value as printed in the paper (default: the shortest form of ``value``)
    std_text: str = ""

    def __post_init__(self) -> None:
        for key in ("value", "std"):
            raw, text_key = getattr(self, key), "text" if key == "value" else "std_text"
            if isinstance(raw, str):
                object.__setattr__(self, text_key, getattr(self, text_key) or raw)
                object.__setattr__(self, key, float(raw))
            elif raw is not None and not getattr(self, text_key):
                object.__setattr__(self, text_key, f"{raw:g}")


@dataclass(frozen=True)
class Cell:
    """One (task, method) experiment of a study.

    ``space``: hyperparameter -> domain (searched) or value (fixed), merged over
    the method's default space. ``recipe``: the paper's setting, one dict that is
    both the fixed config (its keys the cell does not search) and Optuna's first
    point (the keys it searches). ``points``: more configs Optuna evaluates
    after the recipe's. ``row``/``col``: where the cell sits in the report
    table. ``needs``: names of earlier cells whose stored results this cell
    reads (e.g. ``exter_graft`` reads the ``sgd`` cell's gradient norms).
    ``speedup_baseline``: a cell of the same task; the report gives the IRE
    paper's speed-up of this cell's best trial over that cell's, on
    ``speedup_metric``, the way ``speedup_mode`` says
    (``regtune.report_speedup``): ``reach_baseline_final`` (one shared
    schedule: the step at which this cell reaches the baseline's final value,
    and the baseline's final step over it) or ``baseline_reaches_final`` (the
    baseline on its own longer schedule: the steps it needs to reach this
    cell's final value, over this cell's steps).
    """

    name: str
    task: str
    method: str
    space: Mapping[str, Any] = field(default_factory=dict)
    points: tuple[Mapping[str, Any], ...] = ()
    published: Mapping[str, Published] = field(default_factory=dict)
    published_config: Mapping[str, Any] = field(default_factory=dict)
    row: str = ""
    col: str = ""
    needs: tuple[str, ...] = ()
    use_default_space: bool = True
    speedup_baseline: str = ""
    speedup_metric: str = "val/loss"
    speedup_mode: str = "reach_baseline_final"
    # the paper's setting of this cell, written once: a key the cell searches is Optuna's first point, every
    # other key is fixed (below the scale's ``fixed``, as library defaults are); task and method name no recipe
    recipe: Mapping[str, Any] = field(default_factory=dict)
    group: str = ""  # a comparison study's row group (e.g. the paper a method comes from); "" for the papers' tables


@dataclass(frozen=True)
class Scale:
    """A budget preset. ``fixed`` is merged into every cell's config (``size``, ``steps`` ...).

    ``space``: cell name -> search-space entries (domains or values) that replace
    the cell's at this scale, e.g. a range counted in steps that must shrink with
    a smoke budget.
    """

    num_samples: int
    fixed: Mapping[str, Any] = field(default_factory=dict)
    space: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    max_concurrent: int | None = None  # default: what the cluster's CPUs allow
    grace_fraction: float = 1 / 16
    reduction_factor: int = 3
    max_failures: int = 2
    doc: str = ""
    # the confirm phase (studies.engine.confirm): the top ``confirm_top`` full-budget search configs of each cell re-run
    # with ``confirm_seeds`` fresh seeds (None: 2 at a scale named "smoke", else 3; 0: no confirm phase)
    confirm_seeds: int | None = None
    confirm_top: int = 1
    # the tasks whose cells run at this scale (empty: every cell), for a study that puts one set of methods on a
    # CPU task at one scale and a GPU task at another
    tasks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Study:
    name: str
    doc: str
    paper: str
    cells: tuple[Cell, ...]
    scales: Mapping[str, Scale]
    default_scale: str = "paper"
    threshold: tuple[str, float] | None = None  # report "steps to metric >= value"
    report_metrics: tuple[str, ...] = ("val/accuracy",)
    prepare: Callable[[Path, str], Mapping[str, Any]] | None = None  # (study dir, scale) -> extra fixed config
    resources: Callable[[str, str], Mapping[str, float]] | None = None  # (task, scale) -> {"cpu":..,"gpu":..}
    notes: str = ""
    # confirm runs train on the task's full training set (``full_train``) where the search held part of it out:
    # the papers trained on all of it; False where the paper itself held the same part out
    confirm_full_train: bool = True

    def cell(self, name: str) -> Cell:
        for c in self.cells:
            if c.name == name:
                return c
        raise ConfigError(f"unknown cell {name!r} in study {self.name!r}{suggest(name, [c.name for c in self.cells])}")


def at_scale(study: Study, scale: str) -> Study:
    """The study with only the cells that run at ``scale`` (its ``tasks``); unchanged for an unknown scale, which
    ``check_study`` rejects."""
    sc = study.scales.get(scale)
    if sc is None or not sc.tasks:
        return study
    return replace(study, cells=tuple(c for c in study.cells if c.task in sc.tasks))


def cell_space(cell: Cell) -> dict[str, Any]:
    """The cell's search space: the method's defaults overridden by the cell's entries."""
    base = dict(get_method(cell.method).space) if cell.use_default_space else {}
    base.update(cell.space)
    return base


def sample_point(space: Mapping[str, Any]) -> dict[str, Any]:
    """Two corner configs of a space (low and high end), to validate ranges offline."""
    low, high = {}, {}
    for k, v in space.items():
        if isinstance(v, (LogUniform, Uniform, IntUniform)):
            low[k], high[k] = v.low, v.high
        elif isinstance(v, Choice):
            low[k], high[k] = v.values[0], v.values[-1]
        else:
            low[k] = high[k] = v
    return low, high


def cell_configs(
    study: Study,
    cell: Cell,
    scale: str,
    extra: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
):
    """(fixed config, search space) of a cell at a scale; values not yet validated.

    ``extra``: fixed values from the study's ``prepare`` hook (data dirs ...).
    ``overrides``: the user's ``--set key=value``; they win over everything and
    fix a searched key.
    """
    sc = study.scales[scale]
    space = cell_space(cell)
    space.update(sc.space.get(cell.name, {}))
    searched = {k: v for k, v in space.items() if isinstance(v, (LogUniform, Uniform, IntUniform, Choice))}
    recipe = {k: v for k, v in cell.recipe.items() if k not in searched}  # the searched keys: the first point
    fixed = {"task": cell.task, **recipe, **sc.fixed, **(extra or {})}
    fixed.update({k: v for k, v in space.items() if k not in searched})
    known = cell_keys(cell)
    overrides = {k: v for k, v in (overrides or {}).items() if k in known}  # a method's key: the cells that have it
    for k, v in overrides.items():
        fixed[k] = v
        searched.pop(k, None)
    for group in getattr(get_method(cell.method), "exclusive", ()):  # a key set replaces the others of its group
        if any(k in overrides for k in group):  # (e.g. --set ire_start=... over a recipe's ire_start_frac)
            for k in set(group) - set(overrides):
                fixed.pop(k, None)
                searched.pop(k, None)
    return fixed, searched


def cell_points(cell: Cell, searched: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The configs Optuna evaluates first: the recipe's searched keys, then ``cell.points``. A point keeps its
    searched keys (a key fixed at this scale or by ``--set`` is left out); OptunaSearch needs every searched key
    in a point, so one that lacks any is dropped."""
    out = []
    for p in (cell.recipe, *cell.points):
        q = {k: v for k, v in p.items() if k in searched}
        if q and set(q) == set(searched) and q not in out:
            out.append(q)
    return out


def first_config(study: Study, cell: Cell, scale: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The cell's first trial at ``scale``, resolved: its fixed config and its first point (the recipe's searched
    keys; where no point covers the space, the low corner of each range)."""
    fixed, searched = cell_configs(study, cell, scale, None, overrides)
    point = next(iter(cell_points(cell, searched)), None)
    return resolve_config(cell.method, {**fixed, **(point if point is not None else sample_point(searched)[0])})


def cell_keys(cell: Cell) -> set[str]:
    """Every hyperparameter a cell's config may hold (loop, task and method keys)."""
    return {h.name for h in LOOP_HPARAMS} | set(get_task(cell.task).hparam_map) | set(get_method(cell.method).hparam_map)


def check_study(study: Study, scale: str, overrides: Mapping[str, Any] | None = None) -> None:
    """Validate every cell at ``scale`` (keys, ranges, points) without starting anything."""
    if scale not in study.scales:
        raise ConfigError(
            f"--scale {scale!r} is not allowed for study {study.name!r}: expected one of {', '.join(study.scales)}"
        )
    known = set().union(*(cell_keys(c) for c in study.cells))
    for key, value in (overrides or {}).items():
        if key not in known:
            raise ConfigError(
                f"unknown hyperparameter {key!r}={value!r} for study {study.name!r}{suggest(key, known)};"
                f" allowed keys: {', '.join(sorted(known))}"
            )
    names = [c.name for c in study.cells]
    for task in study.scales[scale].tasks:
        if task not in {c.task for c in study.cells}:
            raise ValueError(f"study {study.name!r}: scale {scale!r} runs task {task!r}, which no cell trains")
    if len(set(names)) != len(names):
        raise ValueError(f"study {study.name!r} has duplicate cell names")
    for name in study.scales[scale].space:
        study.cell(name)  # a scale's space override names a cell of the study
    for cell in study.cells:
        get_task(cell.task)
        get_method(cell.method)
        for need in cell.needs:
            if need not in names[: names.index(cell.name)]:
                raise ValueError(f"cell {cell.name!r} needs {need!r}, which must be an earlier cell")
        base = cell.speedup_baseline
        if base and (base not in names or study.cell(base).task != cell.task):
            raise ValueError(f"cell {cell.name!r}: speedup_baseline {base!r} must be a cell of task {cell.task!r}")
        if cell.speedup_mode not in SPEEDUP_MODES:
            raise ValueError(f"cell {cell.name!r}: speedup_mode={cell.speedup_mode!r} is not allowed: expected one of "
                             f"{', '.join(SPEEDUP_MODES)}")
        fixed, searched = cell_configs(study, cell, scale, overrides=overrides)
        for corner in sample_point(searched):
            resolve_config(cell.method, {**fixed, **corner})
        for point in cell.points:
            resolve_config(cell.method, {**fixed, **point})
        unknown = set(cell.recipe) - cell_keys(cell)
        if unknown:
            raise ValueError(f"cell {cell.name!r}: recipe keys {sorted(unknown)} are not hyperparameters of method "
                             f"{cell.method!r} on task {cell.task!r}")
        resolve_config(cell.method, {**fixed, **{k: v for k, v in cell.recipe.items() if k in searched}})


def confirm_seeds(study: Study, scale: str) -> int:
    """The scale's confirm seeds per config: its ``confirm_seeds``, else 2 at a scale named ``smoke``, else 3."""
    sc = study.scales[scale]
    return sc.confirm_seeds if sc.confirm_seeds is not None else (2 if scale == "smoke" else 3)


def stages(study: Study) -> list[list[Cell]]:
    """The cells grouped so that every cell runs in a later stage than the cells it needs (cell order kept)."""
    level: dict[str, int] = {}
    for cell in study.cells:  # check_study guarantees needs name earlier cells
        level[cell.name] = 1 + max((level[n] for n in cell.needs), default=-1)
    out: list[list[Cell]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for cell in study.cells:
        out[level[cell.name]].append(cell)
    return out


def published_domain(value: float, factor: float = 10.0) -> Domain:
    """A log-uniform range centred (in log space) on a published value."""
    return LogUniform(value / factor, value * factor)
