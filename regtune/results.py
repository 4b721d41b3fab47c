"""Tidy result tables: ``trials.parquet`` (one row per trial) and ``curves.parquet``
(one row per report), and how to build them from per-trial report lists.

The report module reads only these files, so a report can be rebuilt offline.

``trials`` columns: ``study, scale, cell, task, method, trial_id, phase,
confirms, started, status, steps, budget, seconds, full_budget, row, col, metric,
mode`` + ``config/<key>``
(the flattened config) + ``final/<metric>`` and ``best/<metric>`` for every
numeric metric + ``steps_to_threshold`` + ``published/value``,
``published/source``, ``published/metric``, ``published/config`` (JSON),
``published/values`` (JSON: every published metric of the cell -> value),
``data_source`` (one line: the data the trial read, ``studies.engine.provenance``),
``published/texts`` (JSON: metric -> the value as the paper prints it),
``published/stds`` (JSON: metric -> [the paper's std, its number of seeds]).

``phase``: ``search`` (a trial of the cell's Optuna + ASHA search) or ``confirm``
(a re-run of the search trial ``confirms`` names, with a fresh ``config/seed``, at
full budget; ``studies.engine.confirm``). ``started``: when the trial started (seconds
since the epoch, from its first report), for the search trace.

``status``: ``completed`` (ran its whole budget), ``stopped`` (stopped early by
the scheduler), ``diverged`` (non-finite loss), ``error`` (the trial raised).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

TRIALS_FILE = "trials.parquet"
CURVES_FILE = "curves.parquet"
KEY_COLUMNS = ["study", "scale", "cell", "cell_index", "task", "method", "trial_id"]


def _flat(prefix: str, d: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, (list, tuple)):
            v = json.dumps(list(v))
        elif isinstance(v, dict):
            v = json.dumps(v, sort_keys=True)
        out[f"{prefix}{k}"] = v
    return out


LOOP_KEYS = {"step", "lr", "diverged"}


def _is_metric(key: str, value: Any) -> bool:
    """Our metrics (``split/name``, step, lr, diverged), not Tune's bookkeeping (pid, timestamp ...)."""
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return numeric and ("/" in key or key in LOOP_KEYS)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON-lines file that another process may be appending to (Tune's ``result.json``).

    Only complete lines count: an unterminated last line is still being written and is left out, and a line
    that does not parse (cut by a crash, then continued by a resumed writer) is skipped. A missing file is
    empty. Every reader of such files (the driver, tests, benchmarks) uses this one function.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    complete = data[: data.rfind(b"\n") + 1]  # everything up to the last newline
    out = []
    for line in complete.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def steps_to(curve: list[Mapping[str, Any]], metric: str, threshold: float) -> float:
    """First reported step whose ``metric`` is >= ``threshold`` (NaN if never)."""
    for r in curve:
        v = r.get(metric)
        if v is not None and v >= threshold:
            return float(r["step"])
    return math.nan


def trial_row(
    meta: Mapping[str, Any],
    config: Mapping[str, Any],
    reports: list[Mapping[str, Any]],
    *,
    errored: bool,
    threshold: tuple[str, float] | None = None,
) -> dict[str, Any]:
    """One ``trials`` row. ``meta`` holds the key columns, budget, metric/mode and published info."""
    numeric = sorted({k for r in reports for k, v in r.items() if _is_metric(k, v)})
    last = reports[-1] if reports else {}
    steps = int(last.get("step", 0))
    diverged = bool(last.get("diverged", 0))
    budget = int(meta["budget"])
    status = "error" if errored else "diverged" if diverged else "completed" if steps >= budget else "stopped"
    row: dict[str, Any] = {**meta, "status": status, "steps": steps, "full_budget": steps >= budget}
    row["seconds"] = float(last.get("train/seconds", last.get("time_total_s", math.nan)))
    row.update(_flat("config/", config))
    for k in numeric:
        vals = [r[k] for r in reports if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
        row[f"final/{k}"] = float(last[k]) if k in last else math.nan
        if vals and not k.startswith("best/") and k != "step":
            lower_better = "loss" in k or "perplexity" in k
            pick = min if lower_better else max
            row[f"best/{k}"] = float(pick(vals))
    if threshold is not None:
        row["steps_to_threshold"] = steps_to(reports, *threshold)
        row["threshold"] = f"{threshold[0]} >= {threshold[1]:g}"
    return row


def curve_rows(meta: Mapping[str, Any], reports: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    keep = {k: meta[k] for k in KEY_COLUMNS if k in meta}
    rows = []
    for r in reports:
        values = {k: v for k, v in r.items() if _is_metric(k, v)}
        rows.append({**keep, **values})
    return rows


def write_parquet_atomic(df: pd.DataFrame, path: Path) -> None:
    """Write next to ``path`` and rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def write_tables(trials: list[dict[str, Any]], curves: list[dict[str, Any]], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    tdf = pd.DataFrame(trials)
    cdf = pd.DataFrame(curves)
    if not tdf.empty:
        tdf = tdf.sort_values(["cell_index", "trial_id"], kind="stable").reset_index(drop=True)
    t_path, c_path = out_dir / TRIALS_FILE, out_dir / CURVES_FILE
    write_parquet_atomic(tdf, t_path)
    write_parquet_atomic(cdf, c_path)
    return t_path, c_path


def read_tables(out_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    t, c = Path(out_dir) / TRIALS_FILE, Path(out_dir) / CURVES_FILE
    missing = [str(p) for p in (t, c) if not p.exists()]
    if missing:
        raise FileNotFoundError(f"no study results: missing {', '.join(missing)} (run the study first)")
    return pd.read_parquet(t), pd.read_parquet(c)
