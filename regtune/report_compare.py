"""A comparison study's leading table: its cells grouped (e.g. by the paper a method comes from), one row a cell.

For studies whose cells carry a ``group`` (column ``group`` of ``trials.parquet``) and no published numbers: the
question is how the methods compare with each other on one task at one budget, so each row gives

* the cell's metric over its confirm seeds (the best search config re-run with fresh seeds): mean ± sample std (n);
* steps to the study's threshold over the same seeds: mean ± std over the seeds that reached it, and how many did;
* cost per optimizer step relative to the reference cell (``adamw`` by default): the mean training seconds per step
  of the cell's runs (search and confirm, all at the same step budget and task, measured in the same study run) over
  the reference cell's; a SAM cell costs about 2x (two passes a step), a micro-batch penalty more;
* the confirmed configuration (the searched keys).

Without confirm runs (the confirm phase off) the cell's best search trial stands in, one seed, and the table says so.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from regtune.report_confirm import _config_text, _scale, compare, confirm_rows, search_rows

REFERENCE = "adamw"


def _mean_std(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    v = compare(values, None)
    if v.n < 2:
        return format(v.mean, fmt)
    return f"{format(v.mean, fmt)} ± {format(v.std, fmt)}"


def _seconds_per_step(rows: pd.DataFrame) -> float:
    ok = rows[(rows["steps"] > 0) & rows["seconds"].notna()] if "seconds" in rows else rows.iloc[0:0]
    if ok.empty:
        return math.nan
    return float((ok["seconds"] / ok["steps"]).mean())


def cell_entries(trials: pd.DataFrame) -> list[dict[str, Any]]:
    """One entry per cell, in cell order."""
    conf, search = confirm_rows(trials), search_rows(trials)
    out = []
    for _, group in trials.groupby("cell_index", sort=True):
        first = group.iloc[0]
        metric = first["metric"]
        mine = conf[conf["cell"] == first["cell"]]
        src = None
        if len(mine):
            tid = mine["confirms"].iloc[0]
            hit = search[search["trial_id"] == tid]
            src = hit.iloc[0] if len(hit) else None
            runs = mine
        else:  # no confirm phase: the best full-budget search trial, one seed
            cand = search[(search["cell"] == first["cell"]) & search["full_budget"].astype(bool)]
            col = f"final/{metric}"
            cand = cand[cand[col].notna()] if col in cand else cand.iloc[0:0]
            if len(cand):
                src = cand.loc[cand[col].idxmax() if first["mode"] == "max" else cand[col].idxmin()]
            runs = cand.loc[[src.name]] if src is not None else cand
        col = f"final/{metric}"
        values = [float(v) * _scale(metric) for v in runs[col].dropna()] if col in runs else []
        reached = [float(s) for s in runs["steps_to_threshold"].dropna()] if "steps_to_threshold" in runs else []
        out.append({"cell": first["cell"], "method": first["method"], "group": first.get("group", "") or "",
                    "metric": metric, "values": values, "runs": len(runs), "reached": reached,
                    "confirmed": bool(len(mine)), "config": src, "sec_per_step": _seconds_per_step(group)})
    return out


def comparison_table(trials: pd.DataFrame, reference: str = REFERENCE) -> str:
    """The markdown table (empty string when no cell has a group)."""
    if "group" not in trials or not trials["group"].fillna("").astype(bool).any():
        return ""
    entries = cell_entries(trials)
    ref = next((e["sec_per_step"] for e in entries if e["cell"] == reference or e["method"] == reference), math.nan)
    thr = trials["threshold"].dropna().iloc[0] if "threshold" in trials and trials["threshold"].notna().any() else ""
    metric = entries[0]["metric"]
    head = ["group", "cell", f"{metric} (%): mean ± std" if "accuracy" in metric else f"{metric}: mean ± std", "seeds"]
    if thr:
        head += [f"steps to {thr}: mean ± std", "reached"]
    head += [f"cost / step vs {reference}", "confirmed config"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group in dict.fromkeys(e["group"] for e in entries):
        for e in (x for x in entries if x["group"] == group):
            fmt = ".2f" if "accuracy" in e["metric"] else ".4g"
            row = [group or "-", e["cell"], _mean_std(e["values"], fmt),
                   f"{len(e['values'])}" + ("" if e["confirmed"] else " (search trial)")]
            if thr:
                row += [_mean_std(e["reached"], ".0f") if e["reached"] else "never", f"{len(e['reached'])}/{e['runs']}"]
            cost = e["sec_per_step"] / ref if ref and not math.isnan(ref) and not math.isnan(e["sec_per_step"]) else math.nan
            row += ["-" if math.isnan(cost) else f"{cost:.2f}x", _config_text(e["config"])]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


EXPLAIN = (
    "One row a cell, grouped by where its method comes from, then the compositions. Each cell searched its own "
    "space (the papers' settings first) and its best full-budget configuration was re-run with fresh seeds: the "
    "metric and the steps to the threshold are mean ± sample std over those seeds ('reached': seeds that got there; "
    "the steps are over those only). Cost per step: mean training seconds per optimizer step of the cell's runs "
    "over the reference cell's, measured in the same study run on the same machine.")


def sections(trials: pd.DataFrame) -> list[str]:
    table = comparison_table(trials)
    return ["## Comparison: confirmed mean ± std per cell", "", EXPLAIN, "", table, ""] if table else []
