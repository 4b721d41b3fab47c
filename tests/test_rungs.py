"""Early stopping that respects delayed generalization (issue 12): under the grokking study's default ASHA rule, a
trial that generalizes late survives the first rungs. The real per-cell scheduler (``studies.engine.stage.CellScheduler``,
Ray's ``AsyncHyperBandScheduler`` inside) is driven with synthetic results shaped like the recorded grokking
curves of ``benchmarks/bench_search.py``; the rule (rung metric, grace period, reduction factor) is read from the
study, as the driver reads it. The same curves under the old rule (validation accuracy, first rung at 1/8 of the
budget) lose the late trial: the test can fail."""

from __future__ import annotations

import math

from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from regtune.tasks.base import get_task
from studies.cpr_grokking import STUDY
from studies.engine.rungs import grace_steps, rung_note
from studies.engine.stage import CellPlan, CellScheduler


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def curve(kind: str, frac: float) -> dict[str, float]:
    """Synthetic metrics at ``frac`` of the budget, after the pool's curves (search_pool.json):

    * ``fast``: a high lr with a bound too tight (kappa 0.5) or too loose (kappa >= 1.26): learns at once, then
      plateaus at 60-85% validation accuracy with its training loss stuck (the fast, capped trials);
    * ``late``: like the published point (lr 1e-3, kappa 0.8: 0-3% until a quarter of the budget, 95% at 47%):
      nothing until after the old first rung (1/8 of the budget), then it generalizes fully (95% at about 37%),
      training loss falling with it (learning and generalizing together, as on the recorded curves).
    """
    if kind.startswith("fast"):
        cap = {"fast_a": 0.62, "fast_b": 0.7, "fast_c": 0.75, "fast_d": 0.85}[kind]
        acc = 0.02 + (cap - 0.02) * _sigmoid((frac - 0.15) / 0.03)
        train = 3.1 - (3.1 - 0.7) * _sigmoid((frac - 0.12) / 0.03)
    else:
        acc = 0.01 + 0.99 * _sigmoid((frac - 0.28) / 0.03)
        train = 3.13 - (3.13 - 0.01) * _sigmoid((frac - 0.26) / 0.04)
    return {"val/accuracy": acc, "train/loss": train, "val/loss": 3.2 * (1 - acc) + 0.03}


def drive(plan: CellPlan, kinds: list[str], every: int) -> dict[str, int]:
    """All trials report in lockstep (trials running side by side), the late one last at every step; the step at
    which each trial was stopped early (trials that reached the budget are left out)."""
    sched = CellScheduler([plan], log=lambda m: None)
    trials = {f"{k}{i}": Trial("regtune", config={"__extras": {"cell": plan.name}}, trial_id=f"{k}{i}", stub=True)
              for i, k in enumerate(kinds)}
    for t in trials.values():
        sched.on_trial_add(None, t)
    stopped: dict[str, int] = {}
    for step in range(every, plan.budget + 1, every):
        for tid, t in trials.items():
            if tid in stopped:
                continue
            result = {"step": step, **curve(tid.rstrip("0123456789"), step / plan.budget)}
            if sched.on_trial_result(None, t, result) == TrialScheduler.STOP:  # also at the budget: ASHA's max_t
                sched.on_trial_complete(None, t, result)
                if step < plan.budget:
                    stopped[tid] = step
    return stopped


def plan_for(metric: str, mode: str, grace_fraction: float, rf: int, budget: int, every: int) -> CellPlan:
    return CellPlan(name="adamcpr", fixed={}, searched={}, points=[], metric=metric, mode=mode, seed=0, num_samples=8,
                    budget=budget, grace=grace_steps(budget, grace_fraction, every), reduction_factor=rf)


KINDS = ["fast_a", "fast_b", "fast_c", "fast_d", "fast_a", "late"]


def _default():
    sc = STUDY.scales[STUDY.default_scale]
    task = get_task("grokking")
    budget, every = sc.fixed["steps"], sc.fixed["eval_every"]
    return sc, task, budget, every


def test_late_generalizer_survives_the_first_rungs_under_the_grokking_default():
    sc, task, budget, every = _default()
    plan = plan_for(task.metric, task.mode, sc.grace_fraction, sc.reduction_factor, budget, every)
    late_95 = next(s for s in range(every, budget + 1, every) if curve("late", s / budget)["val/accuracy"] >= 0.95)
    assert late_95 > budget / 8  # it generalizes well after where the first rung used to be
    stopped = drive(plan, KINDS, every)
    late = [t for t in stopped if t.startswith("late")]
    assert not late, f"the late generalizer was stopped at step {stopped[late[0]]} (first rung {plan.grace})"
    assert any(t.startswith("fast") for t in stopped)  # ASHA still stops trials: early stopping is not off


def test_the_old_rule_stops_the_same_late_generalizer():
    _, task, budget, every = _default()
    plan = plan_for(task.metric, task.mode, 1 / 8, 3, budget, every)
    stopped = drive(plan, KINDS, every)
    assert any(t.startswith("late") for t in stopped)


def test_the_report_names_the_rung_metric_and_grace():
    sc, task, _, _ = _default()
    note = rung_note(STUDY, STUDY.default_scale)
    assert task.metric in note and f"{sc.grace_fraction:.3g} of the budget" in note
