"""The confirm phase of a study: the search's best configs re-run with fresh seeds.

A search picks the best of N noisy trials (all with the study's one seed), so its
best value is biased upward; the papers report means over seeds. After the search
stages, every cell's top ``confirm_top`` configs (among search trials that ran the
full budget and finished) re-run at full budget with ``confirm_seeds`` seeds the
search did not use (the seed sets the initialization and the data order), without
early stopping. Where the search held part of the training set out for validation
(the CIFAR tasks' 40k/10k split, a task with the ``full_train`` key), confirm runs
train on the whole training set (``Study.confirm_full_train``) and the test set is
the number to read, as in the papers.

Confirm trials are ordinary Tune trials of one more stage, ``tune/stage_confirm/``
(one experiment for every cell: ``ConfirmSearch`` hands out the fixed (config, seed)
list round-robin over the cells, a FIFO scheduler never stops a trial), so a killed or
interrupted study resumes them like any stage (``studies.engine.driver.run_stage``), their
MLflow runs are nested under the study run and tagged ``phase=confirm``, and each
row of ``trials.parquet`` has ``phase`` (search | confirm), ``config/seed`` and, for a
confirm row, ``confirms`` (the search trial it re-runs).

The plan is a pure function of the exported search results, so a resumed study
rebuilds the same plan.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search import Searcher

from regtune.report_confirm import search_rows
from regtune.results import read_tables
from regtune.tasks.base import get_task
from studies.engine.stage import CellPlan, RoundRobinSearch
from studies.spec import Study, confirm_seeds

STAGE = "stage_confirm"
FULL_TRAIN = "full_train"  # the task key that trains on the whole training set (regtune.tasks.cifar)


def settings(study: Study, scale: str, seeds: int | None = None, top: int | None = None) -> tuple[int, int]:
    """(seeds per config, configs per cell) of the confirm phase: the CLI's values, else the scale's, else the
    defaults (3 seeds, 2 at a scale named ``smoke``; the top config)."""
    seeds = confirm_seeds(study, scale) if seeds is None else seeds
    return int(seeds), int(top if top is not None else study.scales[scale].confirm_top)


def fresh_seeds(used: Iterable[int], count: int) -> list[int]:
    """``count`` seeds none of ``used`` (the search's), counting up from the largest used one."""
    used = set(used)
    out, s = [], max(used, default=-1) + 1
    while len(out) < count:
        if s not in used:
            out.append(s)
        s += 1
    return out


def top_trials(trials: pd.DataFrame, cell: str, top: int) -> pd.DataFrame:
    """The cell's ``top`` best search trials among those that ran the full budget and finished (ties: trial id)."""
    rows = search_rows(trials)
    rows = rows[(rows["cell"] == cell) & (rows["status"] == "completed") & rows["full_budget"].astype(bool)]
    if rows.empty:
        return rows
    metric, mode = rows["metric"].iloc[0], rows["mode"].iloc[0]
    col = f"final/{metric}"
    if col not in rows:
        return rows.iloc[0:0]
    rows = rows[rows[col].notna()].sort_values("trial_id", kind="stable")
    return rows.sort_values(col, ascending=(mode != "max"), kind="stable").head(top)


@dataclass
class ConfirmPlan(CellPlan):
    """A cell's part of the confirm stage: the fixed configs to run (``num_samples`` = their number)."""

    configs: list[dict[str, Any]] = field(default_factory=list)


def _trial_params(sdir: Path) -> dict[str, dict[str, Any]]:
    """search trial id -> its params.json (exact JSON types: an integer stays an integer)."""
    from studies.engine.guard import _trial_id

    out = {}
    for params_file in sorted((sdir / "tune").glob("stage*/*/params.json")):
        if params_file.parent.parent.name != STAGE:
            out[_trial_id(params_file.parent)] = json.loads(params_file.read_text())
    return out


def plans(study: Study, sdir: Path, search_plans: list[CellPlan], trials: pd.DataFrame, *, seeds: int,
          top: int) -> list[ConfirmPlan]:
    """The confirm stage's plan of every cell that has a full-budget search trial (study order)."""
    params = _trial_params(sdir)
    search = search_rows(trials)
    out = []
    for plan in search_plans:
        cell = study.cell(plan.name)
        chosen = top_trials(trials, plan.name, top)
        used = search.loc[search["cell"] == plan.name, "config/seed"].dropna().astype(int) \
            if "config/seed" in search else []
        new = fresh_seeds(used, seeds)
        full = study.confirm_full_train and FULL_TRAIN in get_task(cell.task).hparam_map
        configs = []
        for trial_id in chosen["trial_id"]:
            found = params.get(trial_id, {})
            for s in new:
                config = copy.deepcopy(plan.fixed)
                config.update({k: found[k] for k in plan.searched if k in found})
                config["seed"] = s
                config["__extras"] = {**config["__extras"], "phase": "confirm", "confirms": trial_id}
                if full:
                    config[FULL_TRAIN] = True
                configs.append(config)
        if configs:
            base = {f.name: getattr(plan, f.name) for f in fields(CellPlan)}
            out.append(ConfirmPlan(**{**base, "num_samples": len(configs), "searched": {}, "points": []},
                                   configs=configs))
    return out


class ConfirmSearch(RoundRobinSearch):
    """Hands out each cell's fixed confirm configs, round-robin over the cells (fewest started first)."""

    def __init__(self, plans: list[ConfirmPlan]):
        super().__init__(metric=None, mode=None)
        self._order = [p.name for p in plans]
        self._configs = {p.name: [copy.deepcopy(c) for c in p.configs] for p in plans}
        self._count = {p.name: 0 for p in plans}

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    def suggest(self, trial_id: str):
        open_cells = [n for n in self._order if self._count[n] < len(self._configs[n])]
        if not open_cells:
            return Searcher.FINISHED
        name = min(open_cells, key=lambda n: self._count[n])
        config = copy.deepcopy(self._configs[name][self._count[name]])
        self._count[name] += 1
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass



def algorithms(plans: list[ConfirmPlan]) -> tuple[ConfirmSearch, FIFOScheduler]:
    """The confirm stage's searcher and scheduler: fixed configs, no early stopping."""
    return ConfirmSearch(plans), FIFOScheduler()


def run_confirm(study: Study, scale: str, sdir: Path, tracker, search_plans: list[CellPlan], exported: list, *,
                seeds: int, top: int, max_concurrent: int, log: Callable[[str], None]) -> None:
    """Run (or resume) the confirm stage after the search stages were exported, then export again."""
    from studies.engine.driver import export, run_stage

    trials, _ = read_tables(sdir)
    confirm = plans(study, sdir, search_plans, trials, seeds=seeds, top=top)
    missing = [p.name for p in search_plans if p.name not in {c.name for c in confirm}]
    if missing:
        log(f"[confirm] no search trial ran the full budget, nothing to confirm: {', '.join(missing)}")
    if not confirm:
        return
    for p in confirm:
        seeds_of = sorted({c["seed"] for c in p.configs})
        configs = list(dict.fromkeys(c["__extras"]["confirms"] for c in p.configs))
        log(f"[{p.name}] confirm: {len(configs)} config(s) ({', '.join(configs)}) x seeds {seeds_of}, "
            f"{p.budget} steps each, no early stopping")
    run_stage(study, scale, STAGE, [study.cell(p.name) for p in confirm], confirm, sdir, tracker,
              num_samples=0, max_concurrent=max_concurrent, log=log, phase="confirm")
    export(study, scale, sdir, exported)
