"""Study report: confirmed numbers and best configurations beside the papers' published numbers, and plots.

Built from ``trials.parquet`` and ``curves.parquet`` alone (see
``regtune.results``). It leads with the confirm phase's mean ± std over fresh
seeds and a verdict per cell (``regtune.report_confirm``). Then the search: for
each cell the best trial is the best final value of the cell's metric among
search trials that ran their full budget (if none did, among all trials, and
the table says so), one seed. Accuracies are printed in percent, like the
papers; published numbers as the papers print them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
import pandas as pd

from regtune import report_compare, report_confirm
from regtune.report_protocol import protocol_sections
from regtune.report_speedup import add_speedups

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _fmt(metric: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if "accuracy" in metric:
        return f"{100 * value:.2f}"
    return f"{value:.4g}"


def _fmt_published(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:g}"


def _published_text(r: pd.Series, metric, value) -> str:
    """A published value as the paper prints it (``published/texts``), else its shortest form."""
    raw = r.get("published/texts")
    texts = json.loads(raw) if isinstance(raw, str) and raw else {}
    return texts.get(metric) or _fmt_published(value)


def best_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: the best trial, with ``fidelity`` = 'full' or 'partial'."""
    rows = []
    for _, group in trials.groupby("cell_index", sort=True):
        metric, mode = group["metric"].iloc[0], group["mode"].iloc[0]
        col = f"final/{metric}"
        ok = group[(group["status"] != "error") & group[col].notna()] if col in group else group.iloc[0:0]
        full = ok[ok["full_budget"]]
        pool, fidelity = (full, "full") if len(full) else (ok, "partial")
        if pool.empty:
            best = group.iloc[0].copy()
            fidelity = "none"
        else:
            best = (pool.loc[pool[col].idxmax()] if mode == "max" else pool.loc[pool[col].idxmin()]).copy()
        best["fidelity"] = fidelity
        best["n_trials"] = len(group)
        best["n_full"] = int(group["full_budget"].sum())
        rows.append(best)
    out = pd.DataFrame(rows).reset_index(drop=True)
    return out.sort_values("cell_index", kind="stable").reset_index(drop=True)


def _config_text(row: pd.Series) -> str:
    keys = json.loads(row.get("searched", "[]") or "[]")
    parts = []
    for k in keys:
        v = row.get(f"config/{k}")
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(parts) or "-"


def cell_table(best: pd.DataFrame) -> str:
    has_test = "final/test/accuracy" in best and best["final/test/accuracy"].notna().any()
    has_ppl = "final/val/perplexity" in best and best["final/val/perplexity"].notna().any()  # language tasks
    has_thr = "steps_to_threshold" in best
    head = ["cell", "task", "method", "trials (full)", "best config", "metric", "ours"]
    if has_ppl:
        head += ["val/perplexity"]
    if has_test:
        head += ["test best", "test final"]
    if has_thr:
        head += [f"steps to {best['threshold'].dropna().iloc[0]}"]
    head += ["published", "published config", "source"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in best.iterrows():
        metric = r["metric"]
        ours = _fmt(metric, r.get(f"final/{metric}"))
        if r["fidelity"] != "full":
            ours += f" ({r['fidelity']} budget)"
        cells = [r["cell"], r["task"], r["method"], f"{r['n_trials']} ({r['n_full']})", _config_text(r), metric, ours]
        if has_ppl:
            cells += [_fmt("val/perplexity", r.get("final/val/perplexity"))]
        if has_test:
            cells += [_fmt("accuracy", r.get("final/test/accuracy_best")), _fmt("accuracy", r.get("final/test/accuracy"))]
        if has_thr:
            s = r.get("steps_to_threshold")
            cells += ["never" if s is None or math.isnan(s) else f"{int(s)}"]
        pub_cfg = r.get("published/config")
        pub_metric = r.get("published/metric")  # name the published quantity where it is not the cell's metric
        pub_text = _published_text(r, pub_metric, r.get("published/value"))
        if isinstance(pub_metric, str) and pub_metric != metric and pub_text != "-":
            pub_text += f" ({pub_metric})"
        cells += [pub_text, pub_cfg if isinstance(pub_cfg, str) and pub_cfg != "{}" else "-",
                  r.get("published/source") if isinstance(r.get("published/source"), str) else "-"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def pivot_table(best: pd.DataFrame) -> str:
    """The published table's shape: rows x columns, 'ours (published)' in each cell."""
    if "row" not in best or not best["row"].astype(bool).any():
        return ""
    rows = list(dict.fromkeys(best["row"]))
    cols = list(dict.fromkeys(best["col"]))
    lines = ["| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for row in rows:
        for row_metric in _row_metrics(best[best["row"] == row]):  # [None]: one line, the cell's own metric
            out = [row if row_metric is None else f"{row} ({_metric_label(row_metric)})"]
            for col in cols:
                hit = best[(best["row"] == row) & (best["col"] == col)]
                if hit.empty:
                    out.append("N/A")
                    continue
                r = hit.iloc[0]
                if row_metric is None:
                    metric = r["published/metric"] if isinstance(r.get("published/metric"), str) else r["metric"]
                    published = r.get("published/value")
                else:
                    metric, published = row_metric, _published_values(r).get(row_metric)
                ours = _fmt(metric, r.get(f"final/{metric}"))
                out.append(f"{ours} ({_published_text(r, metric, published)})")
            lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)


def _published_values(r: pd.Series) -> dict[str, float]:
    """Every published value of a cell, metric -> value (the ``published/values`` JSON column)."""
    raw = r.get("published/values")
    return json.loads(raw) if isinstance(raw, str) and raw else {}


def _row_metrics(group: pd.DataFrame) -> list[str | None]:
    """The published metrics of a table row when its cells publish more than one (e.g. the test accuracy of the
    best-validation and of the last checkpoint: one line each), else [None]."""
    metrics: list[str] = []
    for _, r in group.iterrows():
        metrics += [m for m in _published_values(r) if m not in metrics]
    return list(metrics) if len(metrics) > 1 else [None]


def _metric_label(metric: str) -> str:
    if metric.endswith("_best"):
        return "best"
    return "final" if metric.startswith("test/") else metric


def _value_text(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):  # whole numbers (steps, sizes) as integers, not 1e+03
        return str(int(v)) if v.is_integer() and abs(v) < 1e6 else f"{v:.3g}"
    return str(v)


def pivot_config_table(best: pd.DataFrame) -> str:
    """The published table's shape with the searched hyperparameters: 'key=best found (published)' per cell."""
    if "row" not in best or not best["row"].astype(bool).any() or "published/config" not in best:
        return ""
    rows = list(dict.fromkeys(best["row"]))
    cols = list(dict.fromkeys(best["col"]))
    lines = ["| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for row in rows:
        out = [row]
        for col in cols:
            hit = best[(best["row"] == row) & (best["col"] == col)]
            if hit.empty:
                out.append("N/A")
                continue
            r = hit.iloc[0]
            raw = r.get("published/config")
            published = json.loads(raw) if isinstance(raw, str) and raw else {}
            keys = json.loads(r.get("searched", "[]") or "[]")
            parts = [f"{k}={_value_text(r.get(f'config/{k}'))} ({_value_text(published.get(k))})" for k in keys]
            out.append(", ".join(parts) or "-")
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)


def save_figure(fig, path: Path) -> Path:
    """Lay out, write (PNG, 110 dpi) and close a report figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(best: pd.DataFrame, curves: pd.DataFrame, path: Path) -> Path:
    """Validation metric against step for each cell's best trial, one panel per task."""
    tasks = list(dict.fromkeys(best["task"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for _, r in best[best["task"] == task].iterrows():
            c = curves[(curves["cell"] == r["cell"]) & (curves["trial_id"] == r["trial_id"])].sort_values("step")
            metric = r["metric"]
            if metric in c:
                y = c[metric] * (100 if "accuracy" in metric else 1)
                ax.plot(c["step"], y, label=f"{r['cell']}")
        ax.set_title(task)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(best["metric"].iloc[0] + (" (%)" if "accuracy" in best["metric"].iloc[0] else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


SEARCH_NOTE = ("The best search trial of each cell: one seed, the best of a noisy search (biased upward). Search trials"
               " train without the held-out validation split where the task has one (CIFAR: 40,000 of the 50,000"
               " training images) and are selected on it; compare the confirmed numbers above with the papers.")


def build_report(trials: pd.DataFrame, curves: pd.DataFrame, out_dir: Path, *, title: str, notes: str = "") -> list[Path]:
    """Write ``report.md``, ``curves.png`` and ``search_trace.png`` into ``out_dir``; return their paths."""
    if trials.empty:
        raise ValueError("no trials to report")
    out_dir.mkdir(parents=True, exist_ok=True)
    best = best_trials(report_confirm.search_rows(trials))
    best, speedup_md = add_speedups(best, curves)  # "" unless a cell names a speedup_baseline
    png = plot_curves(best, curves, out_dir / "curves.png")
    trace = report_confirm.plot_search_trace(trials, curves, out_dir / "search_trace.png")
    parts = [f"# {title}", ""]
    if notes:
        parts += [notes, ""]
    parts += report_compare.sections(trials)  # a comparison study's grouped table ("" for the papers' tables)
    parts += report_confirm.sections(trials, curves)  # the confirmed numbers lead
    pivot = pivot_table(best)
    if pivot:
        parts += ["## Published table: best single search trial, one seed (published)", "", SEARCH_NOTE, "", pivot, ""]
        config_pivot = pivot_config_table(best)
        if config_pivot:
            parts += ["## Hyperparameters: best found (published)", "", config_pivot, ""]
    if speedup_md:
        parts += [speedup_md]
    parts += ["## Best configuration per cell (search, one seed)", "", cell_table(best), "",
              "Accuracies in percent. 'ours' is the final value of the cell's metric for the best search trial"
              " that ran the full budget: one seed, the best of a noisy search (biased upward).", "",
              f"![validation curves]({png.name})", "",
              "Search trace: each cell's best validation value found so far against the training steps its search"
              " had spent (trials in start order); a curve still rising at the end means the search had not"
              " converged.", "", f"![search trace]({trace.name})", ""]
    parts += protocol_sections(best)  # best-over-evaluations test accuracy; each cell's data source
    md = out_dir / "report.md"
    md.write_text("\n".join(parts))
    return [md, png, trace]
