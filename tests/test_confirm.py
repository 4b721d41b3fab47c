"""The confirm phase's pieces without Ray: the statistics of the verdict against hand-computed cases, the fresh
seeds, which search trials qualify, the confirm searcher, the report's confirmed tables and the search trace."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from regtune.report_confirm import ONE_SAMPLE, WELCH, compare, pivot, search_trace, summarize, t_quantile
from studies.engine.confirm import ConfirmPlan, ConfirmSearch, fresh_seeds, settings, top_trials
from studies.spec import Published


# --------------------------------------------------------------------------------------------- statistics
def test_t_quantile_matches_the_closed_form_for_two_degrees_of_freedom():
    # df = 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2)), so t_q = (2q - 1) sqrt(2 / (1 - (2q - 1)^2)); q = 0.975: 4.30265
    assert t_quantile(0.975, 2) == pytest.approx(0.95 * math.sqrt(2 / (1 - 0.95 ** 2)), rel=1e-9)
    assert t_quantile(0.975, 2) == pytest.approx(4.3027, abs=1e-4)  # the printed table value
    assert t_quantile(0.975, 1e9) == pytest.approx(1.95996, abs=1e-5)  # the normal limit


def test_one_sample_t_test_by_hand():
    """x = 1, 2, 3: mean 2, s = 1, se = 1/sqrt(3); df = 2, two-sided p = 1 - t / sqrt(2 + t^2)."""
    v = compare([1.0, 2.0, 3.0], 0.0)
    assert (v.mean, v.std, v.n, v.test, v.df) == (2.0, 1.0, 3, ONE_SAMPLE, 2)
    assert v.t == pytest.approx(2 * math.sqrt(3))  # 3.4641 < 4.3027
    assert v.p == pytest.approx(1 - math.sqrt(12 / 14), rel=1e-9)  # 0.0742
    assert v.consistent is True and v.text == "consistent"
    w = compare([1.0, 2.0, 3.0], -1.0)  # t = 3 sqrt(3) = 5.196 > 4.3027
    assert w.t == pytest.approx(3 * math.sqrt(3)) and w.p == pytest.approx(1 - math.sqrt(27 / 29), rel=1e-9)
    assert w.consistent is False and w.text == "differs"


def test_welch_t_test_by_hand():
    """Ours 74, 75, 76 (mean 75, s = 1, n = 3) vs the paper's 74.9 ± 0.21 over 3 seeds:
    a = 1/3, b = 0.21^2/3 = 0.0147, t = 0.1 / sqrt(a + b) = 0.16951,
    df = (a + b)^2 / (a^2/2 + b^2/2) = 0.121127 / 0.0556636 = 2.1760."""
    v = compare([74.0, 75.0, 76.0], 74.9, 0.21, 3)
    assert v.test == WELCH
    assert v.t == pytest.approx(0.16951, abs=1e-5)
    assert v.df == pytest.approx(2.1760, abs=1e-4)
    assert v.consistent is True
    # 76.9, 77.0, 77.1: s = 0.1, a = 0.01/3, t = 2.1 / sqrt(0.0033333 + 0.0147) = 15.638, df = 2.8627 -> differs
    w = compare([76.9, 77.0, 77.1], 74.9, 0.21, 3)
    assert w.t == pytest.approx(15.638, abs=1e-3) and w.df == pytest.approx(2.8627, abs=1e-3)
    assert w.consistent is False and w.p < 0.001
    # without the paper's std the same numbers go through the one-sample test: t = 0.1 / (1/sqrt(3))
    assert compare([74.0, 75.0, 76.0], 74.9).t == pytest.approx(0.1 * math.sqrt(3))


def test_no_test_without_a_published_value_or_with_one_seed():
    assert compare([0.5, 0.7], None).text == "no published value" and compare([0.5, 0.7], None).consistent is None
    one = compare([75.0, math.nan], 74.9)
    assert one.n == 1 and one.consistent is None and one.text == "no test (n = 1)"
    flat = compare([75.0, 75.0, 75.0], 74.9)  # no spread at all: different is different
    assert flat.consistent is False and compare([74.9, 74.9], 74.9).consistent is True


def test_published_keeps_the_printed_text():
    p = Published("96.70", "IRE Table 1")
    assert p.value == 96.7 and p.text == "96.70"
    q = Published(74.9, "CPR", std=0.21, n=3)
    assert q.text == "74.9" and q.std == 0.21 and q.std_text == "0.21" and q.n == 3
    r = Published("76.4", "CPR", std="0.50", n=3)
    assert (r.value, r.text, r.std, r.std_text) == (76.4, "76.4", 0.5, "0.50")


# --------------------------------------------------------------------------------------------- the plan
def test_fresh_seeds_avoid_every_search_seed():
    assert fresh_seeds([0], 3) == [1, 2, 3]
    assert fresh_seeds([0, 0, 0], 2) == [1, 2]
    assert fresh_seeds([5, 2], 2) == [6, 7]
    assert fresh_seeds([], 2) == [0, 1]


def test_settings_defaults_per_scale():
    from studies import get_study

    study = get_study("cpr_grokking")
    assert settings(study, "laptop") == (3, 1) and settings(study, "paper") == (3, 1)
    assert settings(study, "smoke") == (2, 1)
    assert settings(study, "smoke", seeds=0, top=2) == (0, 2)


def _trials(rows):
    base = {"cell_index": 0, "task": "grokking", "method": "adamw", "metric": "val/accuracy", "mode": "max",
            "row": "", "col": "", "searched": json.dumps(["lr"]), "published/values": None,
            "published/texts": None, "published/stds": None}
    return pd.DataFrame([{**base, **r} for r in rows])


def test_top_trials_only_full_budget_completed_search_trials():
    trials = _trials([
        {"cell": "a", "trial_id": "t1", "phase": "search", "status": "completed", "full_budget": True,
         "final/val/accuracy": 0.5},
        {"cell": "a", "trial_id": "t2", "phase": "search", "status": "stopped", "full_budget": False,
         "final/val/accuracy": 0.9},  # stopped early: never confirmed, however good
        {"cell": "a", "trial_id": "t3", "phase": "search", "status": "completed", "full_budget": True,
         "final/val/accuracy": 0.7},
        {"cell": "a", "trial_id": "t4", "phase": "confirm", "status": "completed", "full_budget": True,
         "final/val/accuracy": 0.99},  # a confirm run is not a search result
        {"cell": "b", "trial_id": "t5", "phase": "search", "status": "diverged", "full_budget": True,
         "final/val/accuracy": 0.95},
    ])
    assert list(top_trials(trials, "a", 1)["trial_id"]) == ["t3"]
    assert list(top_trials(trials, "a", 5)["trial_id"]) == ["t3", "t1"]
    assert top_trials(trials, "b", 1).empty


def test_confirm_search_hands_out_the_fixed_configs_round_robin_and_restores(tmp_path):
    def plan(name, seeds):
        configs = [{"__extras": {"cell": name, "phase": "confirm", "confirms": "x"}, "lr": 0.1, "seed": s}
                   for s in seeds]
        return ConfirmPlan(name=name, fixed={}, searched={}, points=[], metric="val/accuracy", mode="max", seed=0,
                           num_samples=len(configs), budget=4, grace=4, reduction_factor=2, configs=configs)

    search = ConfirmSearch([plan("a", [1, 2]), plan("b", [1, 2])])
    got = [search.suggest(f"t{i}") for i in range(3)]
    assert [(c["__extras"]["cell"], c["seed"]) for c in got] == [("a", 1), ("b", 1), ("a", 2)]
    search.save(str(tmp_path / "s.pkl"))
    restored = ConfirmSearch([plan("a", [1, 2]), plan("b", [1, 2])])
    restored.restore(str(tmp_path / "s.pkl"))
    assert restored.suggest("t3")["seed"] == 2 and restored.suggest("t4") == ConfirmSearch.FINISHED


# --------------------------------------------------------------------------------------------- the report
def test_confirmed_pivot_and_verdict_from_rows():
    pub = {"published/values": json.dumps({"test/accuracy": 74.9}), "published/texts": json.dumps({"test/accuracy": "74.9"}),
           "published/stds": json.dumps({"test/accuracy": [0.21, 3, "0.21"]}), "row": "R", "col": "AdamW"}
    rows = [{"cell": "a", "trial_id": "s1", "phase": "search", "confirms": None, "config/seed": 0, "config/lr": 1e-3,
             "status": "completed", "full_budget": True, "steps": 4, "final/test/accuracy": 0.80, **pub}]
    for i, acc in enumerate([0.74, 0.75, 0.76], start=1):
        rows.append({"cell": "a", "trial_id": f"c{i}", "phase": "confirm", "confirms": "s1", "config/seed": i,
                     "config/lr": 1e-3, "config/full_train": True, "status": "completed", "full_budget": True,
                     "steps": 4, "final/test/accuracy": acc, **pub})
    entries = summarize(_trials(rows), pd.DataFrame(columns=["cell", "trial_id", "step"]))
    assert len(entries) == 1
    e = entries[0]
    assert e["seeds"] == [1, 2, 3] and e["confirms"] == "s1"
    assert e["split"] == "test set; trained on the full training set"
    assert e["verdict"].t == pytest.approx(0.16951, abs=1e-4)  # the hand-computed Welch case, in percent
    md = pivot(entries)
    assert "| R | 75.00 ± 1.00 (n=3) vs 74.9 ± 0.21: consistent |" in md


def test_search_trace_is_the_running_best_over_cumulative_steps():
    trials = _trials([
        {"cell": "a", "trial_id": "t1", "phase": "search", "steps": 4, "started": 10.0},
        {"cell": "a", "trial_id": "t0", "phase": "search", "steps": 2, "started": 20.0},  # started second
        {"cell": "a", "trial_id": "c1", "phase": "confirm", "steps": 4, "started": 30.0},  # not the search
    ])
    curves = pd.DataFrame([
        {"cell": "a", "trial_id": "t1", "step": 2, "val/accuracy": 0.3},
        {"cell": "a", "trial_id": "t1", "step": 4, "val/accuracy": 0.2},
        {"cell": "a", "trial_id": "t0", "step": 2, "val/accuracy": 0.5},
        {"cell": "a", "trial_id": "c1", "step": 4, "val/accuracy": 0.9},
    ])
    assert search_trace(trials, curves, "a") == [(2.0, 0.3), (4.0, 0.3), (6.0, 0.5)]


def test_confirmed_speedup_pairs_each_seed_with_the_baselines_same_seed():
    """Seed 1: the baseline ends at loss 1.0 (step 20), the IRE run has it at step 10: 2x. Seed 2: the baseline ends
    at 1.5; the IRE run passes 2.0 -> 1.0 between steps 10 and 20, 1.5 at step 15: 20 / 15 = 1.333x."""
    pub = {"published/values": json.dumps({"speedup": 2.1}), "published/texts": json.dumps({"speedup": "2.1"})}
    rows = []
    for cell, base, extra in (("base", "", {"published/values": None}), ("ire", "base", pub)):
        rows.append({"cell": cell, "trial_id": f"{cell}-s", "phase": "search", "config/seed": 0, "speedup_baseline": base,
                     "status": "completed", "full_budget": True, "steps": 20, "cell_index": int(cell == "ire"), **extra})
        for seed in (1, 2):
            rows.append({"cell": cell, "trial_id": f"{cell}-{seed}", "phase": "confirm", "confirms": f"{cell}-s",
                         "config/seed": seed, "speedup_baseline": base, "status": "completed", "full_budget": True,
                         "steps": 20, "cell_index": int(cell == "ire"), **extra})
    trials = _trials(rows).assign(metric="val/loss", mode="min")
    trials["cell_index"] = [int(c == "ire") for c in trials["cell"]]
    points = {"base-1": [(10, 2.0), (20, 1.0)], "ire-1": [(10, 1.0), (20, 0.5)],
              "base-2": [(10, 2.0), (20, 1.5)], "ire-2": [(10, 2.0), (20, 1.0)]}
    curves = pd.DataFrame([{"cell": t.split("-")[0], "trial_id": t, "step": s, "val/loss": v}
                           for t, pts in points.items() for s, v in pts])
    ire = [e for e in summarize(trials, curves) if e["cell"] == "ire"][0]
    v = ire["verdict"]
    assert ire["metric"] == "speedup" and v.n == 2
    assert v.mean == pytest.approx((2.0 + 4 / 3) / 2) and v.std == pytest.approx((2.0 - 4 / 3) / math.sqrt(2))
    assert v.test == ONE_SAMPLE and v.consistent is True  # t = -1.3 on 1 d.f. (critical value 12.71)
    assert v.t == pytest.approx((v.mean - 2.1) / (v.std / math.sqrt(2)))
