"""Several cells in one Tune experiment: the stage order, the per-cell searchers and the per-cell ASHA
(studies/engine/stage.py), with real OptunaSearch / AsyncHyperBandScheduler objects and real Tune trials (no cluster
needed: the driver-side objects only)."""

from __future__ import annotations

from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler
from ray.tune.search import Searcher

from studies import get_study
from studies.engine.stage import CellPlan, CellScheduler, CellSearch
from studies.spec import Cell, Scale, Study, stages


def _plan(name: str, *, metric="val/accuracy", mode="max", n=3, points=(), budget=4, grace=1, rf=2, seed=0):
    return CellPlan(
        name=name, fixed={"task": "grokking", "__extras": {"cell": name}, "__method": "adamw", "seed": 7},
        searched={"lr": tune.loguniform(1e-4, 1e-2), "weight_decay": tune.uniform(0.0, 1.0)},
        points=list(points), metric=metric, mode=mode, seed=seed, num_samples=n, budget=budget, grace=grace,
        reduction_factor=rf,
    )


def test_stages_put_a_cell_after_the_cells_it_needs():
    cells = tuple(Cell(n, "grokking", "adamw", needs=needs) for n, needs in
                  [("a", ()), ("b", ()), ("c", ("a",)), ("d", ("c",)), ("e", ("b",)), ("f", ())])
    study = Study("s", "doc", "paper", cells, {"smoke": Scale(num_samples=1)})
    assert [[c.name for c in g] for g in stages(study)] == [["a", "b", "f"], ["c", "e"], ["d"]]
    grafting = get_study("implicit_grafting")
    groups = stages(grafting)
    assert len(groups) == 2
    first = {c.name for c in groups[0]}
    assert all(not c.needs for c in groups[0]) and all(set(c.needs) <= first for c in groups[1])
    assert sum(map(len, groups)) == len(grafting.cells)


def test_cell_search_round_robin_points_first_and_finished():
    a = _plan("a", n=3, points=[{"lr": 1e-3, "weight_decay": 0.5}])
    b = _plan("b", n=2, points=[{"lr": 2e-4, "weight_decay": 0.1}], seed=1)
    search = CellSearch([a, b])
    configs = [search.suggest(f"t{i}") for i in range(5)]
    assert [c["__extras"]["cell"] for c in configs] == ["a", "b", "a", "b", "a"]
    assert configs[0]["lr"] == 1e-3 and configs[0]["weight_decay"] == 0.5  # the published point comes first
    assert configs[1]["lr"] == 2e-4 and configs[1]["weight_decay"] == 0.1
    for c in configs:
        assert c["task"] == "grokking" and c["__method"] == "adamw" and c["seed"] == 7
        assert 1e-4 <= c["lr"] <= 1e-2 and 0.0 <= c["weight_decay"] <= 1.0
    assert search.suggest("t5") == Searcher.FINISHED
    assert search.started() == {"a": 3, "b": 2}
    configs[0]["__extras"]["cell"] = "changed"  # a trial's config is its own copy
    assert search.suggest("t6") == Searcher.FINISHED and a.fixed["__extras"]["cell"] == "a"


def test_cell_search_tells_each_cells_optuna_and_survives_save_restore(tmp_path):
    plans = [_plan("a", n=6), _plan("b", n=6, metric="val/loss", mode="min", seed=1)]
    search = CellSearch(plans)
    for i in range(4):
        config = search.suggest(f"t{i}")
        metric = "val/accuracy" if config["__extras"]["cell"] == "a" else "val/loss"
        search.on_trial_result(f"t{i}", {metric: 0.5, "training_iteration": 1})
        search.on_trial_complete(f"t{i}", {metric: config["lr"] * 100, "training_iteration": 2})
    subs = search._subs
    assert len(subs["a"]._ot_study.trials) == 2 and len(subs["b"]._ot_study.trials) == 2
    assert {t.state.name for t in subs["a"]._ot_study.trials} == {"COMPLETE"}
    search.save(str(tmp_path / "searcher.pkl"))
    restored = CellSearch(plans)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.started() == search.started() == {"a": 2, "b": 2}
    # the restored searcher continues exactly where the saved one is
    assert [restored.suggest(f"u{i}") for i in range(3)] == [search.suggest(f"u{i}") for i in range(3)]


def _trial(cell: str, tid: str) -> Trial:
    return Trial("regtune", config={"__extras": {"cell": cell}}, trial_id=tid, stub=True)


def test_cell_scheduler_compares_trials_only_within_their_cell():
    plans = [_plan("a"), _plan("b"), _plan("c", metric="val/loss", mode="min")]
    sched = CellScheduler(plans)
    a1, a2, b1, c1, c2 = (_trial(c, t) for c, t in [("a", "a1"), ("a", "a2"), ("b", "b1"), ("c", "c1"), ("c", "c2")])
    for t in (a1, a2, b1, c1, c2):
        sched.on_trial_add(None, t)
    assert sched.on_trial_result(None, a1, {"step": 1, "val/accuracy": 0.9}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, a2, {"step": 1, "val/accuracy": 0.1}) == TrialScheduler.STOP
    # alone in its cell: not measured against cell a's 0.9 (one shared ASHA would stop it, see below)
    assert sched.on_trial_result(None, b1, {"step": 1, "val/accuracy": 0.2}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, c1, {"step": 1, "val/loss": 2.0}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, c2, {"step": 1, "val/loss": 1.0}) == TrialScheduler.CONTINUE  # lower wins
    assert sched.on_trial_result(None, a1, {"step": 4, "val/accuracy": 0.95}) == TrialScheduler.STOP  # budget end
    sched.on_trial_complete(None, a1, {"step": 4, "val/accuracy": 0.95})
    sched.on_trial_remove(None, b1)

    shared = AsyncHyperBandScheduler(time_attr="step", metric="val/accuracy", mode="max", max_t=4, grace_period=1,
                                     reduction_factor=2)
    for t in (a1, a2, b1):
        shared.on_trial_add(None, t)
    shared.on_trial_result(None, a1, {"step": 1, "val/accuracy": 0.9})
    shared.on_trial_result(None, a2, {"step": 1, "val/accuracy": 0.1})
    assert shared.on_trial_result(None, b1, {"step": 1, "val/accuracy": 0.2}) == TrialScheduler.STOP
