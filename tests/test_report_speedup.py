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
