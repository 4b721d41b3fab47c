"""Speed-up of one loss curve over another: steps to reach the baseline's final loss.

IRE paper (Wang et al., NeurIPS 2024, https://arxiv.org/abs/2405.20763): on
wikitext-2, AdamW-IRE reaches AdamW's 100k-step loss at about 18.5k steps; for
LLaMA the paper's "2x speed-up" means an IRE run reaches the validation loss
that AdamW reaches only with a twice-as-long schedule. ``speedup`` measures the
first: the step at which the faster curve first reaches the baseline's final
loss (linear interpolation between reported points) and the ratio of the
baseline's final step to it. For the second, pass the long-schedule baseline
curve and the short IRE curve: the ratio is then base steps / IRE steps.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Speedup:
    target_loss: float  # the baseline's final loss
    base_step: float  # the baseline's final step
    step: float | None  # first (interpolated) step where the other curve reaches target_loss; None: never
    ratio: float | None  # base_step / step; None: never reached


def _clean(curve: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    points = sorted((float(s), float(v)) for s, v in curve if math.isfinite(float(v)))
    if not points:
        raise ValueError("a loss curve needs at least one finite (step, loss) point")
    return points


def steps_to_reach(curve: Iterable[tuple[float, float]], target: float) -> float | None:
    """First step where ``curve`` (lower is better) reaches ``target``, interpolated linearly; None if never."""
    points = _clean(curve)
    if points[0][1] <= target:
        return points[0][0]
    for (s0, v0), (s1, v1) in itertools.pairwise(points):
        if v1 <= target:
            return s0 + (v0 - target) / (v0 - v1) * (s1 - s0)
    return None


def speedup(curve_base: Iterable[tuple[float, float]], curve_ire: Iterable[tuple[float, float]]) -> Speedup:
    """How much sooner ``curve_ire`` reaches the final loss of ``curve_base`` (both lists of (step, loss))."""
    base = _clean(curve_base)
    base_step, target = base[-1]
    step = steps_to_reach(curve_ire, target)
    ratio = None if step is None or step <= 0 else base_step / step
    return Speedup(target_loss=target, base_step=base_step, step=step, ratio=ratio)
