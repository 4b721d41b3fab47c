"""Replay of search strategies on a recorded pool of full training curves (a tabular benchmark).

Every configuration of the pool (``search_pool``) was trained once to the full budget with its metrics
recorded at every evaluation. A strategy is replayed on those curves, so its stop decisions and its
best-so-far are exact and cheap, and the false-stop rate of early stopping is exact too: every stopped
trial's full curve is known.

* grid: a coarse subset of the pool at full budget (every other lr and kappa value), in a shuffled order;
* random: draws from the pool without replacement (a new permutation once it is used up);
* TPE: a real ``optuna.samplers.TPESampler`` through ask/tell over the pool's two integer coordinates (the
  index of lr and of kappa on their log grids), told each trial's last validation accuracy the way Ray's
  ``OptunaSearch`` is (a trial that ASHA stopped is told as COMPLETE with its low-fidelity value);
* ASHA: the real ``ray.tune.schedulers.AsyncHyperBandScheduler`` (time_attr ``step``, max_t the budget, the
  grace period and reduction factor as the studies set them), fed the recorded results in the order a run
  with ``workers`` trials at a time would produce them (every trial advances at the same speed, in steps).

Compute is counted in training steps summed over trials, the same for every strategy.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
from search_pool import BUDGET, EVERY, KAPPAS, LRS, THRESHOLD, key, steps_to

GRID = tuple((i, j) for i in range(0, len(LRS), 2) for j in range(0, len(KAPPAS), 2))


@dataclass(frozen=True)
class Rung:
    """How ASHA stops trials: the metric it compares at its rungs, and its schedule (as ``studies.engine.driver``)."""

    name: str
    metric: str = "val/accuracy"
    mode: str = "max"
    grace_fraction: float = 1 / 8
    reduction_factor: int = 3

    def grace(self, budget: int = BUDGET, every: int = EVERY) -> int:
        from studies.engine.rungs import grace_steps  # the driver's rounding

        return grace_steps(budget, self.grace_fraction, every)

    def scheduler(self, with_metric: bool = True):
        from ray.tune.schedulers import AsyncHyperBandScheduler

        extra = {"metric": self.metric, "mode": self.mode} if with_metric else {}
        return AsyncHyperBandScheduler(time_attr="step", max_t=BUDGET, grace_period=self.grace(),
                                       reduction_factor=self.reduction_factor, **extra)


class Pool:
    def __init__(self, cache: dict[str, Any]):
        self.runs = {(i, j): cache["runs"][key(lr, k)] for i, lr in enumerate(LRS) for j, k in enumerate(KAPPAS)}
        self.coords = sorted(self.runs)

    def curve(self, c) -> dict[str, list]:
        return self.runs[c]["curve"]

    def final(self, c) -> float:
        cv = self.curve(c)
        return cv["val/accuracy"][-1] if cv["step"][-1] >= BUDGET else 0.0

    def grid_best(self) -> float:
        return max(self.final(c) for c in GRID)

    def reaches(self, c, threshold: float = THRESHOLD) -> bool:
        return steps_to(self.curve(c), threshold) is not None


# --------------------------------------------------------------------------- searchers
class ListSearch:
    def __init__(self, order):
        self.order = list(order)

    def ask(self):
        return self.order.pop(0) if self.order else None

    def tell(self, c, value) -> None:
        pass


class RandomSearch(ListSearch):
    def __init__(self, pool: Pool, seed: int):
        self.rng = np.random.default_rng(seed)
        self.pool = pool
        super().__init__([])

    def ask(self):
        if not self.order:
            self.order = [self.pool.coords[i] for i in self.rng.permutation(len(self.pool.coords))]
        return super().ask()


class TPESearch:
    def __init__(self, seed: int):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
        self.trials: dict[Any, list] = {}

    def ask(self):
        t = self.study.ask()
        c = (t.suggest_int("lr_index", 0, len(LRS) - 1), t.suggest_int("kappa_index", 0, len(KAPPAS) - 1))
        self.trials.setdefault(c, []).append(t)
        return c

    def tell(self, c, value) -> None:
        self.study.tell(self.trials[c].pop(0), value)


# --------------------------------------------------------------------------- one replayed search
@dataclass
class Outcome:
    events: list = field(default_factory=list)  # (compute, final val accuracy) of each full-budget trial
    trials: list = field(default_factory=list)  # (coord, last step, full budget reached)
    compute: int = 0

    def compute_to(self, target: float) -> float:
        return next((c for c, v in self.events if v >= target), math.inf)

    def best_at(self, computes) -> np.ndarray:
        out, best, k = [], 0.0, 0
        for c in computes:
            while k < len(self.events) and self.events[k][0] <= c:
                best = max(best, self.events[k][1])
                k += 1
            out.append(best)
        return np.array(out)


def replay(pool: Pool, search, rung: Rung | None, compute_budget: int, workers: int = 2) -> Outcome:
    """Run ``search`` (ask/tell) with ``workers`` trials at a time, stopped by ``rung``'s ASHA (None: every trial
    runs to the full budget), until ``compute_budget`` steps are spent or the searcher has nothing left."""
    from ray.tune.schedulers import TrialScheduler

    sched = rung.scheduler() if rung else None
    out = Outcome()
    heap, running, seq = [], {}, 0

    def launch(slot: int, now: int) -> None:
        nonlocal seq
        c = search.ask()
        if c is None:
            return
        trial = SimpleNamespace(trial_id=f"t{seq:05d}", config={})
        if sched:
            sched.on_trial_add(None, trial)
        running[slot] = {"c": c, "trial": trial, "k": 0, "last": 0}
        seq += 1
        heapq.heappush(heap, (now + pool.curve(c)["step"][0], seq, slot))

    for slot in range(workers):
        launch(slot, 0)
    while heap:
        now, _, slot = heapq.heappop(heap)
        r = running[slot]
        cv, k = pool.curve(r["c"]), r["k"]
        step = cv["step"][k]
        if out.compute + step - r["last"] > compute_budget:
            break  # the budget is spent: every running trial ends here, unfinished
        out.compute += step - r["last"]
        r["last"] = step
        result = {"step": step, **{m: v[k] for m, v in cv.items() if m != "step" and v[k] is not None}}
        ended = k == len(cv["step"]) - 1  # the run's last report (its budget, or a divergence)
        decision = sched.on_trial_result(None, r["trial"], result) if sched else TrialScheduler.CONTINUE
        if ended or decision == TrialScheduler.STOP:
            if sched:
                sched.on_trial_complete(None, r["trial"], result)
            search.tell(r["c"], cv["val/accuracy"][k] or 0.0)
            full = step >= BUDGET
            out.trials.append((r["c"], step, full))
            if full:
                out.events.append((out.compute, cv["val/accuracy"][k] or 0.0))
            launch(slot, now)
        else:
            r["k"] = k + 1
            heapq.heappush(heap, (now + cv["step"][k + 1] - step, seq, slot))
            seq += 1
    return out


def false_stops(pool: Pool, outcome: Outcome, target: float) -> tuple[int, int, int, int]:
    """(trials stopped before the budget; of those: reach THRESHOLD by the budget, end within target; trials,
    stopped or not, whose configuration reaches THRESHOLD by the budget)."""
    stopped = [c for c, step, full in outcome.trials if not full and step < pool.curve(c)["step"][-1]]
    return (len(stopped), sum(pool.reaches(c) for c in stopped), sum(pool.final(c) >= target for c in stopped),
            sum(pool.reaches(c) for c, _, _ in outcome.trials))
