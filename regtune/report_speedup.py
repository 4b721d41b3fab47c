"""Speed-up of one loss curve over another: steps to reach the baseline's final loss.

IRE paper (Wang et al., NeurIPS 2024, https://arxiv.org/abs/2405.20763): on
wikitext-2, AdamW-IRE reaches AdamW's 100k-step loss at about 18.5k steps; for
LLaMA the paper's "2x speed-up" means an IRE run reaches the validation loss
that AdamW reaches only with a twice-as-long schedule. ``speedup`` measures the
first: the step at which the faster curve first reaches the baseline's final
loss (linear interpolation between reported points) and the ratio of the
baseline's final step to it. For the second, pass the long-schedule baseline
curve and the short IRE curve: the ratio is then base steps / IRE steps.

``add_speedups`` builds the study report's speed-up section from the best
trials of cells that name a ``speedup_baseline`` (``studies.spec.Cell``).
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


# --------------------------------------------------------------------------
# the study report's speed-up section (rows of trials.parquet / curves.parquet)
SPEEDUP_METRIC = "val/loss"


def _curve(curves, row, metric: str) -> list[tuple[float, float]]:
    c = curves[(curves["cell"] == row["cell"]) & (curves["trial_id"] == row["trial_id"])]
    if metric not in c:
        return []
    return [(float(s), float(v)) for s, v in zip(c["step"], c[metric]) if not math.isnan(v)]


def add_speedups(best, curves, metric: str = SPEEDUP_METRIC):
    """Speed-up of every best trial whose cell names a ``speedup_baseline`` (a cell of the same task).

    ``best``: one row per cell (``regtune.report.best_trials``); ``curves``: the
    curves table. Returns ``(best with a final/speedup column, markdown section)``;
    the section is "" when no cell names a baseline or the curves lack ``metric``.
    The speed-up is measured between the two cells' best trials: the step at
    which the cell's curve first reaches the baseline's final ``metric``, and
    the baseline's final step over it.
    """
    if "speedup_baseline" not in best or not best["speedup_baseline"].fillna("").astype(bool).any():
        return best, ""
    best = best.copy()
    by_cell = {r["cell"]: r for _, r in best.iterrows()}
    head = ["task", "baseline", "cell", f"baseline final {metric} (step)", "reached at step", "speed-up",
            "published speed-up"]
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines = []
    for i, r in best.iterrows():
        base = by_cell.get(r.get("speedup_baseline") or "")
        if base is None:
            continue
        base_curve, curve = _curve(curves, base, metric), _curve(curves, r, metric)
        if not base_curve or not curve:
            continue
        s = speedup(base_curve, curve)
        best.loc[i, "final/speedup"] = s.ratio if s.ratio is not None else math.nan
        pub = r.get("published/value") if r.get("published/metric") == "speedup" else None
        pub_text = "-" if pub is None or math.isnan(pub) else f"{pub:g}x"
        reached = "never" if s.step is None else f"{s.step:.0f}"
        ratio = "not reached" if s.ratio is None else f"{s.ratio:.2f}x"
        table.append(f"| {r['task']} | {base['cell']} | {r['cell']} | {s.target_loss:.4g} ({s.base_step:.0f}) | "
                     f"{reached} | {ratio} | {pub_text} |")
        last = curve[-1][0] if curve else 0
        when = (f"at step {s.step:.0f}: speed-up {ratio}" if s.step is not None
                else f"not within its {last:.0f} steps: speed-up not reached")
        lines.append(f"- speed-up on {r['task']}: {r['method']} ({r['cell']}) reaches {base['method']}'s final "
                     f"{metric} {s.target_loss:.4g} (step {s.base_step:.0f}) {when}")
    if not lines:
        return best, ""
    intro = (f"Step at which each cell's best trial first reaches its baseline's final {metric} (linear"
             " interpolation between reports), and the baseline's final step over that step (IRE paper).")
    text = ["## Speed-up over the baseline", "", intro, "", *table, "", *lines, ""]
    return best, "\n".join(text)
