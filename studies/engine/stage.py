"""Several cells in one Tune experiment (a *stage*).

A study's cells used to be one Tune experiment each; every experiment cost a
Tuner setup, a new trial process and an idle CPU while its last trial ran
alone (about 3-5 s per cell, more than a smoke cell's training). A stage runs
every cell that does not depend on another one in a single experiment, and
keeps the per-cell semantics behind Tune's single searcher and scheduler slots:

* ``CellSearch``: one ``OptunaSearch`` per cell (its own space, seed, metric,
  mode and the published point first); suggestions go round-robin over the
  cells until each has ``num_samples`` trials, merged with the cell's fixed
  config (which names the cell and its method for the trainable).
* ``CellScheduler``: one ASHA per cell (its own budget, grace period and
  metric), so trials are only ever compared with trials of their own cell.

A trial that fails on a configuration or data error (``trainables.permanent``)
is not retried and stops its cell: ``CellScheduler`` drops the trial's retries
when its last report names the error, and ``CellSearch`` hands out no more
trials of that cell; the stage then ends with fewer trials than planned
(``unstarted``).

``studies.spec.stages(study)`` orders the cells: a cell that ``needs`` another (external
grafting reads the reference cell's stored gradient norms) runs in a later
stage, after the driver has exported the earlier stages' results.
"""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from trainables.permanent import PERMANENT_KEY

CELL_KEY = "__extras"  # trial.config[CELL_KEY]["cell"] names the trial's cell


def cell_of(config: Mapping[str, Any]) -> str:
    return config[CELL_KEY]["cell"]


@dataclass
class CellPlan:
    """What one cell contributes to a stage's experiment."""

    name: str
    fixed: dict[str, Any]  # fixed config, driver inputs (__extras, __method) included
    searched: dict[str, Any]  # ray.tune domains
    points: list[dict[str, Any]]  # evaluated first (the published setting)
    metric: str
    mode: str
    seed: int
    num_samples: int
    budget: int  # ASHA max_t, in steps
    grace: int
    reduction_factor: int
    resources: dict[str, float] = field(default_factory=dict)


class RoundRobinSearch(Searcher):
    """A searcher whose whole state is its attributes (Tune saves it with the experiment), counting the trials it
    handed out per cell in ``_count``."""

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__.copy(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))

    def started(self) -> dict[str, int]:
        return dict(self._count)


class CellSearch(RoundRobinSearch):
    """Round-robin over per-cell Optuna searchers; ``FINISHED`` once every cell has its trials."""

    def __init__(self, plans: list[CellPlan]):
        super().__init__(metric=None, mode=None)
        self._order = [p.name for p in plans]
        self._fixed = {p.name: p.fixed for p in plans}
        self._quota = {p.name: p.num_samples for p in plans}
        self._count = {p.name: 0 for p in plans}
        self._owner: dict[str, str] = {}
        self._stopped: dict[str, str] = {}  # cell -> the permanent error that stopped it
        self._subs = {
            p.name: OptunaSearch(space=OptunaSearch.convert_search_space(p.searched), metric=p.metric, mode=p.mode,
                                 seed=p.seed,
                                 points_to_evaluate=p.points or None) if p.searched else None
            for p in plans
        }
        self._metric_of = {p.name: p.metric for p in plans}

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # each cell has its own metric and space

    def suggest(self, trial_id: str):
        stopped = getattr(self, "_stopped", {})  # (a searcher saved before this field existed has none)
        open_cells = [n for n in self._order if self._count[n] < self._quota[n] and n not in stopped]
        if not open_cells:
            return Searcher.FINISHED
        name = min(open_cells, key=lambda n: self._count[n])  # fewest started first; ties in cell order
        sub = self._subs[name]
        params = sub.suggest(trial_id) if sub is not None else {}
        self._count[name] += 1
        self._owner[trial_id] = name
        return {**copy.deepcopy(self._fixed[name]), **params}

    def _sub(self, trial_id: str):
        name = self._owner.get(trial_id)
        return (self._subs.get(name), self._metric_of.get(name)) if name else (None, None)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if PERMANENT_KEY in result and trial_id in self._owner:  # a config or data error: no more trials of the cell
            self.__dict__.setdefault("_stopped", {})[self._owner[trial_id]] = result[PERMANENT_KEY]
            return
        sub, metric = self._sub(trial_id)
        if sub is not None and metric in result:
            sub.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        sub, _ = self._sub(trial_id)  # a trial this searcher handed out (its cell's Optuna asked for it then)
        if sub is not None:
            sub.on_trial_complete(trial_id, result=result, error=error)



class CellScheduler(FIFOScheduler):
    """One ASHA per cell; trials are routed by the cell their config names."""

    def __init__(self, plans: list[CellPlan], log: Callable[[str], None] = print):
        super().__init__()
        self._log = log
        self._ashas = {
            p.name: AsyncHyperBandScheduler(time_attr="step", metric=p.metric, mode=p.mode, max_t=p.budget,
                                            grace_period=p.grace, reduction_factor=p.reduction_factor)
            for p in plans
        }

    def __getstate__(self) -> dict:  # Tune pickles the scheduler with the experiment: the log function stays out
        state = self.__dict__.copy()  # (print may be wrapped by then: "not the same object as builtins.print")
        state.pop("_log", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._log = print

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # each cell's ASHA has its own metric and mode

    def _asha(self, trial) -> AsyncHyperBandScheduler:
        return self._ashas[cell_of(trial.config)]

    def on_trial_add(self, tune_controller, trial) -> None:
        self._asha(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if PERMANENT_KEY in result:
            # The trial raises right after this report. Tune decides on a retry from Trial.max_failures
            # (Trial.should_recover) when the error arrives, before telling any scheduler or callback, and
            # FailureConfig applies to every trial alike: so this (public) attribute of the one trial is the
            # only place to say "this error is final". CONTINUE lets the error arrive as the trial's ERROR.
            trial.max_failures = 0
            self._log(stop_line(cell_of(trial.config), trial.trial_id, result[PERMANENT_KEY]))
            return FIFOScheduler.CONTINUE
        return self._asha(trial).on_trial_result(tune_controller, trial, result)

    # ASHA forgets a trial once it completed with its metric, and raises KeyError (its bracket lookup, before it
    # changes anything) for a trial it does not hold: one it already forgot, or one of a restored experiment
    # (ASHA's rung state is not saved). Such a trial has nothing left to tell ASHA.
    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        asha = self._asha(trial)
        try:
            asha.on_trial_complete(tune_controller, trial, result)
        except KeyError:
            pass

    def on_trial_remove(self, tune_controller, trial) -> None:
        asha = self._asha(trial)
        try:
            asha.on_trial_remove(tune_controller, trial)
        except KeyError:
            pass

    def on_trial_error(self, tune_controller, trial) -> None:
        self._asha(trial).on_trial_error(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(f"[{name}] {asha.debug_string()}" for name, asha in self._ashas.items())



def stop_line(cell: str, trial_id: str, error: str) -> str:
    return (f"[{cell}] stopped: trial {trial_id} failed with {error} -- not retried (a configuration or data error "
            "fails the same way again); no more trials of this cell")


def stopped_cells(results) -> dict[str, tuple[str, str]]:
    """cell -> (trial id, one-line error) of the trial whose permanent error stopped it (a stage's ResultGrid)."""
    out = {}
    for r in results:
        error = (r.metrics or {}).get(PERMANENT_KEY)
        if error and r.config:
            out.setdefault(cell_of(r.config), ((r.metrics or {}).get("trial_id", "?"), error))
    return out


def unstarted(results, stopped: Mapping[str, Any], num_samples: int) -> int:
    """Trials the stopped cells never started (a stage with stopped cells has fewer trials than planned)."""
    started: dict[str, int] = {}
    for r in results:
        if r.config:
            started[cell_of(r.config)] = started.get(cell_of(r.config), 0) + 1
    return sum(max(0, num_samples - started.get(cell, 0)) for cell in stopped)
