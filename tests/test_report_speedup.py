"""Speed-up of a loss curve over a baseline (IRE paper's steps-to-AdamW's-final-loss)."""

from __future__ import annotations

import math

import pytest

from regtune.report_speedup import speedup, steps_to_reach


def test_hand_case_interpolates_between_reported_points():
    base = [(0, 5.0), (100, 3.0), (200, 2.0)]
    ire = [(0, 5.0), (50, 2.5), (100, 1.5), (200, 1.0)]
    s = speedup(base, ire)
    # target 2.0 lies halfway between (50, 2.5) and (100, 1.5): step 75
    assert s.target_loss == 2.0 and s.base_step == 200
    assert s.step == pytest.approx(75.0) and s.ratio == pytest.approx(200 / 75)


def test_never_reached_and_unsorted_and_non_finite_points():
    base = [(200, 2.0), (0, 5.0), (100, 3.0)]
    assert speedup(base, [(0, 5.0), (100, 2.5), (200, 2.1)]).ratio is None
    assert speedup(base, [(0, 5.0), (100, 2.5), (200, 2.1)]).step is None
    # a diverged point is ignored; exact hit at a reported step
    assert speedup(base, [(0, 5.0), (50, math.nan), (100, 2.0)]).step == pytest.approx(100.0)
    # already below the target at the first report: that report's step
    assert steps_to_reach([(10, 1.0), (20, 0.5)], 2.0) == 10.0
    with pytest.raises(ValueError):
        speedup([], base)


def test_same_curve_is_no_speedup():
    curve = [(0, 4.0), (10, 3.0), (20, 2.5)]
    assert speedup(curve, curve).ratio == pytest.approx(1.0)


# --------------------------------------------------------------------------
# the LLaMA protocol: AdamW on its own 2T-step schedule against AdamW-IRE on T steps
def _line(slope: float, last: int, every: int, start: float = 4.0):
    return [(t, start - slope * t) for t in range(0, last + 1, every)]


def test_baseline_on_a_2t_schedule_hand_cases():
    from regtune.report_speedup import baseline_speedup

    adamw_2t = _line(0.01, 200, 40)  # 4.0 at step 0 down to 2.0 at step 200 = 2T, reported every 40 steps
    # IRE ends its T = 100 steps at loss 2.3: AdamW needs 170 steps (between its reports at 160 and 200): 1.7x
    s = baseline_speedup(adamw_2t, [(0, 4.0), (50, 3.0), (100, 2.3)])
    assert s.target_loss == pytest.approx(2.3) and s.base_step == 100
    assert s.step == pytest.approx(170.0) and s.ratio == pytest.approx(1.7)
    # IRE at T reaches AdamW's 2T loss exactly: the published "2x"
    assert baseline_speedup(adamw_2t, _line(0.02, 100, 10)).ratio == pytest.approx(2.0)
    # IRE ends below anything AdamW reaches in 2T: no number, only the bound (the caller reports > 2x)
    s = baseline_speedup(adamw_2t, _line(0.025, 100, 10))
    assert s.step is None and s.ratio is None
    # a baseline worse than the fast curve is a speed-up below 1
    assert baseline_speedup(_line(0.02, 200, 10), _line(0.01, 100, 10)).ratio == pytest.approx(0.5)


def _rows(mode: str, metric: str, pub_values: str | None):
    import pandas as pd

    base = {"task": "t", "method": "adamw", "published/metric": None, "published/value": math.nan,
            "published/values": None, "speedup_metric": metric, "speedup_mode": mode}
    return pd.DataFrame([
        {**base, "cell": "adamw-2T", "trial_id": "x", "speedup_baseline": ""},
        {**base, "cell": "ire", "method": "adamw_ire", "trial_id": "y", "speedup_baseline": "adamw-2T",
         "published/values": pub_values},
    ])


def test_report_section_for_the_2t_cell_prints_the_published_speedup_beside_ours():
    import pandas as pd

    from regtune.report_speedup import add_speedups

    a, b = _line(0.01, 200, 40), [(0, 4.0), (50, 3.0), (100, 2.3)]
    curves = pd.DataFrame({"cell": ["adamw-2T"] * len(a) + ["ire"] * len(b), "trial_id": ["x"] * len(a) + ["y"] * len(b),
                           "step": [s for s, _ in a + b], "val/loss": [v for _, v in a + b]})
    best = _rows("baseline_reaches_final", "val/loss", '{"speedup": 2.1}')
    out, md = add_speedups(best, curves)
    assert out.loc[1, "final/speedup"] == pytest.approx(1.7) and math.isnan(out.loc[0, "final/speedup"])
    assert "| t | adamw-2T (200 steps) | ire | 2.3 (100) | 170 | 1.70x | 2.1x |" in md
    assert ("- speed-up on t: adamw (adamw-2T, 200-step schedule) reaches adamw_ire's final val/loss 2.3 "
            "(step 100, ire) at step 170: speed-up 1.70x") in md
    fast = curves.assign(**{"val/loss": [v for _, v in a] + [4.0, 2.5, 1.5]})
    out, md = add_speedups(best, fast)
    assert math.isnan(out.loc[1, "final/speedup"]) and "| never (within 200) | > 2.00x (not reached) | 2.1x |" in md


def test_speedup_on_the_training_loss_with_the_published_value_in_the_table():
    """ire_wikitext2: the published 5.4x is on the training loss; val/loss must not be used."""
    import pandas as pd

    from regtune.report_speedup import add_speedups

    curves = pd.DataFrame({"cell": ["adamw-2T"] * 3 + ["ire"] * 3, "trial_id": ["x"] * 3 + ["y"] * 3,
                           "step": [10, 20, 40] * 2, "train/loss": [5.0, 4.0, 3.0, 4.0, 2.0, 1.0],
                           "val/loss": [5.0, 4.0, 3.0, 6.0, 6.0, 6.0]})
    best = _rows("reach_baseline_final", "train/loss", '{"train/loss": 2.35, "speedup": 5.4}')
    out, md = add_speedups(best, curves)
    assert out.loc[1, "final/speedup"] == pytest.approx(40 / 15)  # on train/loss; on val/loss: never reached
    assert "| t | adamw-2T | ire | 3 (40) | 15 | 2.67x | 5.4x |" in md and "final train/loss 3 (step 40)" in md


def test_built_report_keeps_the_speedup_table_whole_and_labels_a_published_speedup(tmp_path):
    """The 2T protocol through build_report: the table rows follow its header, the published table puts our
    speed-up beside the paper's, and the per-cell table names the published quantity (not the cell's val/loss)."""
    import json

    import pandas as pd

    from regtune.report import build_report

    rows, curves = [], []
    for i, (cell, method, steps, slope, base, mode, pub) in enumerate([
            ("a2t", "adamw", 200, 0.01, "", "reach_baseline_final", None),
            ("ire", "adamw_ire", 100, 0.017, "a2t", "baseline_reaches_final", 2.1)]):
        rows.append({"study": "s", "scale": "smoke", "cell": cell, "cell_index": i, "task": "tk", "method": method,
                     "trial_id": f"t{i}", "budget": steps, "metric": "val/loss", "mode": "min", "row": cell,
                     "col": "LLaMA", "searched": "[]", "speedup_baseline": base, "speedup_metric": "val/loss",
                     "speedup_mode": mode, "status": "completed", "steps": steps, "full_budget": True,
                     "final/val/loss": 4 - slope * steps, "published/value": pub or math.nan,
                     "published/metric": "speedup" if pub else None, "published/source": "paper",
                     "published/config": None, "published/values": json.dumps({"speedup": pub}) if pub else None})
        curves += [{"cell": cell, "trial_id": f"t{i}", "step": s, "val/loss": 4 - slope * s} for s in range(0, steps + 1, 10)]
    md = build_report(pd.DataFrame(rows), pd.DataFrame(curves), tmp_path, title="t")[0].read_text()
    lines = md.splitlines()
    sep = next(i for i, ln in enumerate(lines) if ln.startswith("| task | baseline (its schedule) |")) + 1
    assert lines[sep + 1] == "| tk | a2t (200 steps) | ire | 2.3 (100) | 170 | 1.70x | 2.1x |"
    assert "| ire | 1.7 (2.1) |" in md  # published table: our speed-up (same quantity) beside the paper's
    assert "| 2.3 | 2.1 (speedup) |" in md  # per-cell table: the cell's val/loss is not passed off as the 2.1
