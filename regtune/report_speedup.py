"""Speed-up of one loss curve over another, in the two protocols of the IRE paper.

IRE paper (Wang et al., NeurIPS 2024, https://arxiv.org/abs/2405.20763):

* ``reach_baseline_final`` (wikitext-2): one shared schedule; AdamW-IRE reaches
  AdamW's final (100k-step) training loss at about 18.5k steps: 5.4x.
  ``speedup(base, fast)``: the step at which ``fast`` first reaches ``base``'s
  final loss (linear interpolation between reported points), and the ratio
  of ``base``'s final step to it.
* ``baseline_reaches_final`` (LLaMA "2x speed-up"): AdamW, trained on its own
  2T-step schedule, against AdamW-IRE trained on a T-step schedule.
  ``baseline_speedup(base_2t, fast)``: the number of steps the baseline needs
  to reach the validation loss that ``fast`` ends its T steps with, over T.
  When the baseline never gets there within its schedule the speed-up is only
  bounded: more than (baseline's last step) / T.

``add_speedups`` builds the study report's speed-up section from the best
trials of cells that name a ``speedup_baseline`` (``studies.spec.Cell``), on
each cell's ``speedup_metric`` and ``speedup_mode``; the published speed-up
(a cell's published ``speedup`` value) prints beside ours only in that table.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Speedup:
    target_loss: float  # the final loss of the curve that sets the target (the baseline's in ``speedup``)
    base_step: float  # the final step of that curve
    step: float | None  # first (interpolated) step where the other curve reaches target_loss; None: never
    ratio: float | None  # the speed-up; None: never reached


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


def baseline_speedup(curve_base: Iterable[tuple[float, float]], curve_fast: Iterable[tuple[float, float]]) -> Speedup:
    """LLaMA protocol: steps ``curve_base`` (its own, longer schedule) needs to reach the final loss of
    ``curve_fast``, over ``curve_fast``'s final step T. ``target_loss`` / ``base_step``: ``curve_fast``'s final
    loss and step; ``step``: where the baseline reaches it (None: not within its schedule)."""
    fast = _clean(curve_fast)
    fast_step, target = fast[-1]
    step = steps_to_reach(curve_base, target)
    ratio = None if step is None or fast_step <= 0 else step / fast_step
    return Speedup(target_loss=target, base_step=fast_step, step=step, ratio=ratio)


# --------------------------------------------------------------------------
# the study report's speed-up section (rows of trials.parquet / curves.parquet)
SPEEDUP_METRIC = "val/loss"
MODES = ("reach_baseline_final", "baseline_reaches_final")


def _curve(curves, row, metric: str) -> list[tuple[float, float]]:
    c = curves[(curves["cell"] == row["cell"]) & (curves["trial_id"] == row["trial_id"])]
    if metric not in c:
        return []
    return [(float(s), float(v)) for s, v in zip(c["step"], c[metric]) if not math.isnan(v)]


def _published_speedup(r) -> float | None:
    raw = r.get("published/values")
    values = json.loads(raw) if isinstance(raw, str) and raw else {}
    if "speedup" in values:
        return float(values["speedup"])
    pub = r.get("published/value") if r.get("published/metric") == "speedup" else None
    return None if pub is None or math.isnan(pub) else float(pub)


def _text(r, key: str, default: str) -> str:
    v = r.get(key)
    return v if isinstance(v, str) and v else default


def add_speedups(best, curves, metric: str = SPEEDUP_METRIC):
    """Speed-up of every best trial whose cell names a ``speedup_baseline`` (a cell of the same task).

    ``best``: one row per cell (``regtune.report.best_trials``); ``curves``: the
    curves table. Returns ``(best with a final/speedup column, markdown section)``;
    the section is "" when no cell names a baseline or the curves lack the metric.
    Each row's ``speedup_metric`` (default ``metric``) and ``speedup_mode``
    (default ``reach_baseline_final``) say what is measured between the two
    cells' best trials (see the module docstring); one table per (mode, metric).
    """
    if "speedup_baseline" not in best or not best["speedup_baseline"].fillna("").astype(bool).any():
        return best, ""
    best = best.copy()
    by_cell = {r["cell"]: r for _, r in best.iterrows()}
    tables: dict[tuple[str, str], list[str]] = {}
    lines = []
    for i, r in best.iterrows():
        base = by_cell.get(r.get("speedup_baseline") or "")
        if base is None:
            continue
        m, mode = _text(r, "speedup_metric", metric), _text(r, "speedup_mode", MODES[0])
        base_curve, curve = _curve(curves, base, m), _curve(curves, r, m)
        if not base_curve or not curve:
            continue
        pub = _published_speedup(r)
        pub_text = "-" if pub is None else f"{pub:g}x"
        if mode == MODES[1]:
            row, line, ratio = _baseline_reaches(r, base, base_curve, curve, m, pub_text)
        else:
            row, line, ratio = _reach_baseline(r, base, base_curve, curve, m, pub_text)
        best.loc[i, "final/speedup"] = ratio if ratio is not None else math.nan
        tables.setdefault((mode, m), []).append(row)
        lines.append(line)
    if not lines:
        return best, ""
    text = ["## Speed-up over the baseline", ""]
    for (mode, m), rows in tables.items():
        text += [*_intro(mode, m), *rows, ""]
    text += [*lines, ""]
    return best, "\n".join(text)


def _intro(mode: str, m: str) -> list[str]:
    if mode == MODES[1]:
        head = ["task", "baseline (its schedule)", "cell", f"cell's final {m} (step T)", "baseline reaches it at step",
                "speed-up", "published speed-up"]
        intro = (f"Steps the baseline, trained on its own (longer) schedule, needs to reach the final {m} of the"
                 " cell's best trial (linear interpolation between reports), over the cell's T steps (IRE paper,"
                 " LLaMA: AdamW on a 2T-step schedule against AdamW-IRE on T steps).")
    else:
        head = ["task", "baseline", "cell", f"baseline final {m} (step)", "reached at step", "speed-up",
                "published speed-up"]
        intro = (f"Step at which each cell's best trial first reaches its baseline's final {m} (linear"
                 " interpolation between reports), and the baseline's final step over that step (IRE paper).")
    return [intro, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


def _reach_baseline(r, base, base_curve, curve, m: str, pub_text: str):
    s = speedup(base_curve, curve)
    reached = "never" if s.step is None else f"{s.step:.0f}"
    ratio = "not reached" if s.ratio is None else f"{s.ratio:.2f}x"
    row = (f"| {r['task']} | {base['cell']} | {r['cell']} | {s.target_loss:.4g} ({s.base_step:.0f}) | "
           f"{reached} | {ratio} | {pub_text} |")
    last = curve[-1][0] if curve else 0
    when = (f"at step {s.step:.0f}: speed-up {ratio}" if s.step is not None
            else f"not within its {last:.0f} steps: speed-up not reached")
    line = (f"- speed-up on {r['task']}: {r['method']} ({r['cell']}) reaches {base['method']}'s final "
            f"{m} {s.target_loss:.4g} (step {s.base_step:.0f}) {when}")
    return row, line, s.ratio


def _baseline_reaches(r, base, base_curve, curve, m: str, pub_text: str):
    s = baseline_speedup(base_curve, curve)
    base_last = max(step for step, _ in base_curve)
    bound = base_last / s.base_step if s.base_step > 0 else math.inf
    reached = f"never (within {base_last:.0f})" if s.step is None else f"{s.step:.0f}"
    ratio = f"> {bound:.2f}x (not reached)" if s.ratio is None else f"{s.ratio:.2f}x"
    row = (f"| {r['task']} | {base['cell']} ({base_last:.0f} steps) | {r['cell']} | {s.target_loss:.4g} "
           f"({s.base_step:.0f}) | {reached} | {ratio} | {pub_text} |")
    when = (f"at step {s.step:.0f}: speed-up {ratio}" if s.step is not None
            else f"not within its {base_last:.0f} steps: speed-up {ratio}")
    line = (f"- speed-up on {r['task']}: {base['method']} ({base['cell']}, {base_last:.0f}-step schedule) reaches "
            f"{r['method']}'s final {m} {s.target_loss:.4g} (step {s.base_step:.0f}, {r['cell']}) {when}")
    return row, line, s.ratio
