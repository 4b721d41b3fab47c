"""Shared fixtures: running the real CLI (local Ray, a real sqlite MLflow store) and reading what it wrote."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update({"PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "0",
                "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", **extra})
    return env


def wait_until(cond, timeout: float, what: str) -> None:
    """Poll ``cond`` every 0.1 s until it is true; fail with ``what`` once ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def run_cli(*args: str, timeout: float = 600, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """``python -m studies ARGS`` in a fresh process; output captured as text."""
    return subprocess.run([sys.executable, "-m", "studies", *args], cwd=cwd or ROOT, env=cli_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def mlflow_runs(uri: str, experiment: str):
    """(parent runs, child runs) of an experiment in a tracking store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} in {uri}"
    runs = client.search_runs([exp.experiment_id], max_results=10000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def run_smoke_study(tmp_path_factory, name: str):
    """``studies run NAME --scale smoke`` in a fresh storage dir; (study dir, trials, curves)."""
    import pandas as pd

    storage = tmp_path_factory.mktemp(name)
    proc = run_cli("run", name, "--scale", "smoke", "--storage", str(storage), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sdir = storage / f"{name}-smoke"
    return sdir, pd.read_parquet(sdir / "trials.parquet"), pd.read_parquet(sdir / "curves.parquet")


def report_table(md: str, heading: str) -> dict[str, list[str]]:
    """A report table under ``heading``: first column -> the other cells."""
    block = md.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in block.splitlines() if ln.startswith("|") and not ln.startswith("|---")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines)}


@pytest.fixture
def cli():
    return run_cli


def check_confirm(trials, md: str, seeds: int = 2) -> None:
    """The confirm phase of a smoke study: every cell's best full-budget search trial re-ran with ``seeds`` fresh
    seeds (none a search seed) at full budget, and the report leads with mean ± std (n) and a verdict per cell."""
    search, conf = trials[trials["phase"] == "search"], trials[trials["phase"] == "confirm"]
    assert set(trials["phase"]) == {"search", "confirm"} and trials["trial_id"].is_unique
    assert set(conf["cell"]) == set(search["cell"])
    for cell, rows in conf.groupby("cell"):
        mine = search[search["cell"] == cell]
        assert rows["config/seed"].nunique() == seeds == len(rows), (cell, rows["config/seed"].tolist())
        assert not set(rows["config/seed"]) & set(mine["config/seed"]), cell  # fresh seeds
        assert set(rows["confirms"]) <= set(mine.loc[mine["full_budget"], "trial_id"]), cell
        assert rows["full_budget"].all() and (rows["status"] != "stopped").all(), cell  # no early stopping
        searched = json.loads(rows["searched"].iloc[0])
        src = mine.set_index("trial_id").loc[rows["confirms"].iloc[0]]
        for k in searched:  # the confirmed config is the search trial's
            assert rows[f"config/{k}"].iloc[0] == src[f"config/{k}"], (cell, k)
    assert search["confirms"].isna().all()
    table = report_table(md, "Confirmed results per cell")
    head = table.pop("cell")
    assert head[-1 if "steps to" not in head[-1] else -2] == "verdict" and "ours: mean ± std (n)" in head
    ours, verdict = head.index("ours: mean ± std (n)"), head.index("verdict")
    assert set(table) == set(trials["cell"])
    for cell, cells in table.items():
        if cells[head.index("metric")] == "speedup":  # a seed whose IRE run never reaches the baseline has none
            assert re.fullmatch(rf"\S+ ± \S+ \(n=\d\)( of {seeds} runs)?|- \(0 of {seeds} runs\)", cells[ours])
            assert cells[verdict] in {"consistent", "differs"} or cells[verdict].startswith("no test"), cells
            continue
        assert re.fullmatch(rf"\S+ ± \S+ \(n={seeds}\)", cells[ours]), (cell, cells[ours])
        assert cells[verdict] in {"consistent", "differs", "no published value"}, (cell, cells[verdict])
