"""The report's confirmed numbers: mean ± std over fresh seeds beside the published value, a verdict, and
the search trace.

Rows of ``trials.parquet`` with ``phase == "confirm"`` re-run a cell's best search config(s) with seeds the
search did not use (``studies.engine.confirm``). For each cell and published metric this module gives our mean,
sample standard deviation (n - 1) and n, and tests whether they are consistent with the published value at
95% confidence, two-sided:

* the paper gives a ± over n seeds (e.g. CPR's CIFAR-100 table, 3 seeds): Welch's t-test of the two means,
  t = (m - mu) / sqrt(s^2/n + sigma^2/n_p), Welch-Satterthwaite degrees of freedom;
* else a one-sample t-test of our mean against the published value, t = (m - mu) / (s / sqrt(n)), n - 1 d.f.

"consistent" means the test does not reject equality at the 5% level (|t| <= t_{0.975, df}); "differs"
means it does. Fewer than two seeds: no test. Accuracies are compared in percent, like the papers.

``plot_search_trace``: for each cell, the best validation value found so far against the training steps the
search had spent (its trials in start order), so a reader sees whether the search had converged.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import matplotlib
import pandas as pd
from scipy import stats

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LEVEL = 0.95
WELCH, ONE_SAMPLE = "Welch t-test", "one-sample t-test"


def search_rows(trials: pd.DataFrame) -> pd.DataFrame:
    """The search trials (tables without a ``phase`` column predate the confirm phase: all search)."""
    return trials[trials["phase"] == "search"] if "phase" in trials else trials


def confirm_rows(trials: pd.DataFrame) -> pd.DataFrame:
    return trials[trials["phase"] == "confirm"] if "phase" in trials else trials.iloc[0:0]


# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    mean: float
    std: float  # sample std (n - 1); NaN for n < 2
    n: int
    test: str  # WELCH, ONE_SAMPLE, or "" (no test)
    t: float
    df: float
    p: float  # two-sided
    consistent: bool | None  # None: no test
    text: str  # "consistent", "differs", or why there is no test


def compare(values: Sequence[float], published: float | None, published_std: float | None = None,
            published_n: int | None = None, level: float = LEVEL) -> Verdict:
    """Our seeds' ``values`` against a published mean (± ``published_std`` over ``published_n`` seeds)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    mean = sum(xs) / n if n else math.nan
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n >= 2 else math.nan
    nan = math.nan
    if published is None or not math.isfinite(published):
        return Verdict(mean, std, n, "", nan, nan, nan, None, "no published value")
    if n < 2:
        return Verdict(mean, std, n, "", nan, nan, nan, None, f"no test (n = {n})")
    a = std ** 2 / n
    if published_std is not None and published_n is not None and published_n >= 2:
        b = published_std ** 2 / published_n
        test = WELCH
        df = (a + b) ** 2 / (a ** 2 / (n - 1) + b ** 2 / (published_n - 1)) if a + b > 0 else n + published_n - 2
    else:
        b, test, df = 0.0, ONE_SAMPLE, n - 1
    se = math.sqrt(a + b)
    diff = mean - published
    if se == 0:  # no spread on either side: equal or not
        t = 0.0 if diff == 0 else math.copysign(math.inf, diff)
    else:
        t = diff / se
    p = float(2 * stats.t.sf(abs(t), df))
    ok = abs(t) <= t_quantile(1 - (1 - level) / 2, df)
    return Verdict(mean, std, n, test, t, float(df), p, bool(ok), "consistent" if ok else "differs")


def t_quantile(q: float, df: float) -> float:
    """Student's t quantile (scipy.stats.t.ppf)."""
    return float(stats.t.ppf(q, df))


# --------------------------------------------------------------------------
def _json(r: pd.Series, key: str) -> dict[str, Any]:
    raw = r.get(key)
    return json.loads(raw) if isinstance(raw, str) and raw else {}


def _scale(metric: str) -> float:
    return 100.0 if "accuracy" in metric else 1.0


def _num(metric: str, v: float, spread: bool = False) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    if "accuracy" in metric:
        return f"{v:.2f}"
    return f"{v:.2g}" if spread else f"{v:.4g}"


def published_metrics(r: pd.Series) -> list[tuple[str, float | None, str, float | None, int | None]]:
    """(metric, value, text as published (with its ± where given), std, n) of every published number of a cell;
    the cell's own metric with no value when nothing is published."""
    values, texts, stds = _json(r, "published/values"), _json(r, "published/texts"), _json(r, "published/stds")
    out = []
    for m, v in values.items():
        std, n, std_text = (list(stds.get(m) or []) + [None, None, None])[:3]
        text = texts.get(m, f"{v:g}")
        out.append((m, v, text if std is None else f"{text} ± {std_text or f'{std:g}'}", std, n))
    return out or [(r["metric"], None, "-", None, None)]


def _speedups(trials: pd.DataFrame, curves: pd.DataFrame) -> pd.Series:
    """Each confirm row's speed-up over its ``speedup_baseline`` cell's confirm run with the same seed, measured
    as the cell's search is (its ``speedup_metric`` and ``speedup_mode``, ``regtune.report_speedup``)."""
    from regtune.report_speedup import MODES, SPEEDUP_METRIC, _curve, _text, baseline_speedup, speedup

    conf = confirm_rows(trials)
    out = pd.Series(math.nan, index=conf.index, dtype=float)
    if "speedup_baseline" not in conf:
        return out
    for i, r in conf.iterrows():
        base_cell = r.get("speedup_baseline")
        if not isinstance(base_cell, str) or not base_cell:
            continue
        base = conf[(conf["cell"] == base_cell) & (conf["config/seed"] == r["config/seed"])]
        if base.empty:
            continue
        metric, mode = _text(r, "speedup_metric", SPEEDUP_METRIC), _text(r, "speedup_mode", MODES[0])
        base_curve, curve = _curve(curves, base.iloc[0], metric), _curve(curves, r, metric)
        if base_curve and curve:
            s = baseline_speedup(base_curve, curve) if mode == MODES[1] else speedup(base_curve, curve)
            out[i] = s.ratio if s.ratio is not None else math.nan
    return out


def _values(rows: pd.DataFrame, metric: str) -> list[float]:
    col = f"final/{metric}"
    if col not in rows:
        return []
    return [float(v) * _scale(metric) for v in rows[col]]


def _split(rows: pd.DataFrame, metric: str) -> str:
    split = metric.split("/")[0] if "/" in metric else "-"
    if split not in ("val", "test", "train"):
        return "val (speed-up)" if metric == "speedup" else "-"
    text = f"{split} set" if split == "test" else f"{split} split"
    if metric.endswith("_best"):
        text += " (best-val checkpoint)"
    full = rows["config/full_train"].dropna().astype(bool) if "config/full_train" in rows else pd.Series([], dtype=bool)
    if len(full) and full.all():
        text += "; trained on the full training set"
    elif len(full):
        text += "; trained without the held-out val split"
    return text


def summarize(trials: pd.DataFrame, curves: pd.DataFrame) -> list[dict[str, Any]]:
    """One entry per (cell, confirmed search trial, published metric), in cell order."""
    trials = trials.copy()
    conf = confirm_rows(trials)
    if "final/speedup" not in trials and len(conf):
        trials.loc[conf.index, "final/speedup"] = _speedups(trials, curves)
        conf = confirm_rows(trials)
    search = search_rows(trials)
    out = []
    for _, group in trials.groupby("cell_index", sort=True):
        first = group.iloc[0]
        rows = conf[conf["cell"] == first["cell"]]
        confirmed = list(dict.fromkeys(rows["confirms"])) if len(rows) else [None]
        for rank, tid in enumerate(confirmed, start=1):
            mine = rows[rows["confirms"] == tid] if tid is not None else rows
            src = search[search["trial_id"] == tid]
            for metric, value, text, std, n in published_metrics(first):
                entry = {"cell": first["cell"], "task": first["task"], "method": first["method"],
                         "row": first.get("row", ""), "col": first.get("col", ""), "rank": rank, "confirms": tid,
                         "config": src.iloc[0] if len(src) else None, "metric": metric, "published": value,
                         "published_text": text, "published_std": std, "published_n": n,
                         "seeds": sorted(int(s) for s in mine["config/seed"]) if len(mine) else [], "runs": len(mine),
                         "split": _split(mine, metric) if len(mine) else "-",
                         "verdict": compare(_values(mine, metric), value, std, n)}
                if "steps_to_threshold" in mine and len(mine):
                    reached = mine["steps_to_threshold"].dropna()
                    entry["threshold"] = (compare(list(reached), None), len(reached), len(mine),
                                          mine["threshold"].dropna().iloc[0] if mine["threshold"].notna().any() else "")
                out.append(entry)
    return out


def ours_text(e: dict[str, Any]) -> str:
    """'mean ± std (n=..)'; runs without a finite value (diverged, a speed-up never reached) are counted apart."""
    v: Verdict = e["verdict"]
    runs = e.get("runs", v.n)
    if runs == 0:
        return "not confirmed"
    if v.n == 0:
        return f"- (0 of {runs} runs)"
    text = f"{_num(e['metric'], v.mean)} ± {_num(e['metric'], v.std, spread=True)} (n={v.n})"
    return text + (f" of {runs} runs" if v.n < runs else "")


def published_text(e: dict[str, Any]) -> str:
    return "-" if e["published"] is None else e["published_text"]


def pivot(entries: list[dict[str, Any]]) -> str:
    """The published table's shape: 'mean ± std (n=..) vs published: verdict' per cell (its top config)."""
    from regtune.report import _metric_label  # the same row labels as the search table's
    top = [e for e in entries if e["rank"] == 1 and e["row"]]
    if not top:
        return ""
    rows, cols = list(dict.fromkeys(e["row"] for e in top)), list(dict.fromkeys(e["col"] for e in top))
    multi = {r: len({e["metric"] for e in top if e["row"] == r}) > 1 for r in rows}
    lines = ["| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for row in rows:
        metrics = list(dict.fromkeys(e["metric"] for e in top if e["row"] == row))
        for metric in metrics:
            label = f"{row} ({_metric_label(metric)})" if multi[row] else row
            out = [label]
            for col in cols:
                hit = [e for e in top if e["row"] == row and e["col"] == col and e["metric"] == metric]
                if not hit:
                    out.append("N/A")
                    continue
                e = hit[0]
                out.append(f"{ours_text(e)} vs {published_text(e)}: {e['verdict'].text}")
            lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)


def _config_text(r: pd.Series | None) -> str:
    if r is None:
        return "-"
    parts = []
    for k in json.loads(r.get("searched", "[]") or "[]"):
        v = r.get(f"config/{k}")
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(parts) or "-"


def table(entries: list[dict[str, Any]]) -> str:
    """Every cell: the confirmed config, split, seeds, ours, published, the test and the verdict."""
    has_thr = any("threshold" in e for e in entries)
    head = ["cell", "task", "method", "confirmed config (search trial)", "split", "seeds", "metric",
            "ours: mean ± std (n)", "published", "test", "t (df)", "p", "verdict"]
    if has_thr:
        thr = next(e["threshold"][3] for e in entries if "threshold" in e)
        head += [f"steps to {thr}: mean ± std (reached)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        v: Verdict = e["verdict"]
        cfg = f"{_config_text(e['config'])} ({e['confirms']})" if e["confirms"] else "-"
        tdf = f"{v.t:.2f} ({v.df:.1f})" if v.test else "-"
        p = f"{v.p:.3f}" if v.test else "-"
        cells = [e["cell"], e["task"], e["method"], cfg, e["split"], ", ".join(map(str, e["seeds"])) or "-",
                 e["metric"], ours_text(e), published_text(e), v.test or "-", tdf, p,
                 v.text if e["runs"] else "not confirmed"]
        if has_thr:
            if "threshold" in e:
                tv, k, total, _ = e["threshold"]
                cells.append(f"{_num('steps', tv.mean)} ± {_num('steps', tv.std, spread=True)} ({k}/{total})"
                             if k else f"never (0/{total})")
            else:
                cells.append("-")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


EXPLAIN = (
    "Each cell's best search configuration (among search trials that ran the full budget) re-run at the full "
    "budget with fresh seeds (seeds the search did not use: they change the initialization and the data order), "
    "without early stopping. 'ours' is the mean ± sample standard deviation over those seeds (n of them). "
    "Verdict at 95% confidence, two-sided: where the paper gives a ± over n seeds, Welch's t-test of the two "
    "means; else a one-sample t-test of our mean against the published value. 'consistent': the test does not "
    "reject equality; 'differs': it does (a small n can only detect large differences). Accuracies in percent. "
    "'split' says where each number comes from.")


def sections(trials: pd.DataFrame, curves: pd.DataFrame) -> list[str]:
    """The report's leading sections (markdown lines)."""
    entries = summarize(trials, curves)
    parts: list[str] = []
    shaped = pivot(entries)
    if shaped:
        parts += ["## Published table: confirmed mean ± std (n) vs published", "", shaped, ""]
    parts += ["## Confirmed results per cell", "", EXPLAIN, "", table(entries), ""]
    if confirm_rows(trials).empty:
        parts += ["No confirm runs in this study's results (the confirm phase was off, or no search trial ran "
                  "the full budget): the numbers below are single search trials.", ""]
    return parts


# --------------------------------------------------------------------------
def search_trace(trials: pd.DataFrame, curves: pd.DataFrame, cell: str) -> list[tuple[float, float]]:
    """(cumulative training steps, best value so far) over the cell's search trials in start order."""
    rows = search_rows(trials)
    rows = rows[rows["cell"] == cell].sort_values("trial_id", kind="stable")
    if "started" in rows:
        rows = rows.sort_values("started", kind="stable")
    if rows.empty:
        return []
    metric, mode = rows["metric"].iloc[0], rows["mode"].iloc[0]
    better = max if mode == "max" else min
    spent, best, out = 0.0, None, []
    for _, r in rows.iterrows():
        c = curves[(curves["cell"] == cell) & (curves["trial_id"] == r["trial_id"])].sort_values("step")
        if metric in c:
            for step, v in zip(c["step"], c[metric]):
                if v is not None and math.isfinite(v):
                    best = v if best is None else better(best, v)
                    out.append((spent + float(step), float(best)))
        spent += float(r["steps"])
    return out


def plot_search_trace(trials: pd.DataFrame, curves: pd.DataFrame, path: Path) -> Path:
    """One panel per task, one line per cell: the search's best validation value against steps spent."""
    search = search_rows(trials)
    tasks = list(dict.fromkeys(search["task"]))
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(6 * max(1, len(tasks)), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        cells = list(dict.fromkeys(search.loc[search["task"] == task, "cell"]))
        metric = search.loc[search["task"] == task, "metric"].iloc[0]
        for cell in cells:
            trace = search_trace(trials, curves, cell)
            if trace:
                x, y = zip(*trace)
                ax.step(x, [v * _scale(metric) for v in y], where="post", label=cell)
        ax.set_title(f"{task}: search trace")
        ax.set_xlabel("training steps spent by the search (trials in start order)")
        ax.set_ylabel(f"best {metric} so far" + (" (%)" if "accuracy" in metric else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    from regtune.report import save_figure

    return save_figure(fig, path)
