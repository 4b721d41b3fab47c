"""``python -m studies estimate``: the ASHA model against Ray's own bracket, the calibration, the CLI."""

from __future__ import annotations

import numpy as np
import pytest

from studies.engine.estimate import asha_rungs, calibrate, expected_asha
from tests.conftest import run_cli


def test_asha_rungs_are_rays_milestones_below_the_budget():
    assert asha_rungs(4000, 500, 3, 100) == [500, 1500]  # 4500 would be past the budget
    assert asha_rungs(300, 100, 3, 50) == [100]  # Ray's rung at 300 = the budget: no steps saved there
    assert asha_rungs(1000, 150, 4, 100) == [200, 600]  # judged at the first report on or after 150, 600
    assert asha_rungs(100, 100, 3, 10) == []


def test_expected_asha_small_cases_by_hand():
    # one rung: the first trial always continues (nothing recorded), the second iff it beats the first: 1.5
    full, steps = expected_asha(2, 300, 100, 3)
    assert full == pytest.approx(1.5, abs=0.04)
    assert steps == pytest.approx(2 * 100 + 1.5 * 200, rel=0.02)
    # two rungs: 1 + 1/2 reach the second; there the second survivor continues with probability 1/2: 1.25
    assert expected_asha(2, 900, 100, 3)[0] == pytest.approx(1.25, abs=0.04)
    assert expected_asha(5, 100, 100, 3) == (5.0, 500.0)  # no rung: every trial runs the budget


def test_expected_asha_matches_rays_bracket():
    """Drive Ray's own AsyncHyperBand bracket with random metrics, trials one after another."""
    from ray.tune.schedulers.async_hyperband import _Bracket
    from ray.tune.schedulers.trial_scheduler import TrialScheduler

    class T:
        def __init__(self, i):
            self.trial_id = str(i)

    n, budget, grace, rf, every = 8, 4000, 250, 3, 250
    rng = np.random.default_rng(1)
    reached, trained = [], []
    for _ in range(600):
        bracket = _Bracket(grace, budget, rf, 0)
        full = steps = 0
        for i in range(n):
            t = T(i)
            for step in range(every, budget + 1, every):
                steps += every
                if bracket.on_result(t, step, rng.random()) == TrialScheduler.STOP:
                    break
            else:
                full += 1
        reached.append(full)
        trained.append(steps)
    full_model, steps_model = expected_asha(n, budget, grace, rf, every)
    assert full_model == pytest.approx(np.mean(reached), abs=4 * np.std(reached) / np.sqrt(600) + 0.05)
    assert steps_model == pytest.approx(np.mean(trained), rel=0.05)


def test_calibrate_measures_steps_and_evaluation():
    cal = calibrate("adamw", {"task": "grokking", "size": "smoke", "steps": 100}, steps=5, threads=1)
    assert cal["steps_per_s"] > 0 and cal["eval_s"] > 0 and cal["device"] == "cpu"
    share = calibrate("adamw", {"task": "grokking", "size": "smoke", "steps": 100, "workers": 2}, steps=5, threads=1)
    assert share["steps_per_s"] > 0  # one worker of two: its share of the batch, no collectives


def test_estimate_cli_prints_the_table():
    proc = run_cli("estimate", "cpr_grokking", "--scale", "smoke", "--steps", "5", "--gpus", "4", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("cell "))
    assert [line.split()[0] for line in lines[head + 1:head + 5]] == ["adamw", "adam_rescale", "adamcpr", "total"]
    assert "cluster 4 GPUs" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["estimate", "cpr_grokking", "--steps", "0"], "--steps=0 is not allowed"),
    (["estimate", "nope"], "unknown study"),
    (["estimate", "cpr_grokking", "--scale", "huge"], "--scale 'huge' is not allowed"),
    (["estimate", "ire_imagenet", "--scale", "paper"], "imagenet"),
])
def test_estimate_bad_input_exits_2(args, message, tmp_path):
    proc = run_cli(*args, timeout=300, REGTUNE_DATA_DIR=str(tmp_path / "no-data"))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
