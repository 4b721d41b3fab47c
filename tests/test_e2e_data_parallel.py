"""A study whose trials are Ray Train jobs of 2 data-parallel workers (gloo on CPU), end to end on local Ray:
ASHA, Optuna, MLflow and the Parquet export as for any study, and a driver killed (SIGKILL) mid-trial resumes
with every worker restored from rank 0's checkpoint.

Every trial ends with Tune stopping it (ASHA at max_t) while its Train run may still be shutting down: the
next trial's workers can only start because the placement group such a stop leaves reserved is released
(``trainables.ray_internals``; without it the second trial's worker-group start times out again and again).

Cost: 3 trials of 150 steps (search only: no confirm phase), each a Ray Train job whose worker group takes
~10-60 s to start, in two driver runs. The curves are checked against the same configs trained in this
process (one process, same global batch): equal up to float32 round-off grown over 150 Adam steps, also
across the resume.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pandas as pd
import torch

from regtune.loop import Run
from tests.conftest import mlflow_runs
from tests.test_fault_tolerance import Driver, _rows, _wait_for

# 150 steps, a report every 50: seconds between reports, so the kill lands mid-trial
ARGS = ["--scale", "smoke", "--num-samples", "1", "--confirm-seeds", "0",
        "--set", "workers=2", "--set", "steps=150", "--set", "eval_every=50"]


def _snapshot_step(train_dir: Path) -> int:
    """Step of the latest checkpoint Ray Train has recorded for a trial's Train run (0: none yet)."""
    for snap in train_dir.glob("train_*/checkpoint_manager_snapshot.json"):
        try:
            return int(json.loads(snap.read_text())["latest_checkpoint_result"]["metrics"]["step"])
        except (OSError, ValueError, KeyError, TypeError):  # being written
            return 0
    return 0


def test_two_worker_study_runs_and_resumes_after_driver_kill(tmp_path):
    storage = tmp_path / "results"
    sdir = storage / "cpr_grokking-smoke"
    stage = sdir / "tune" / "stage1"
    args = ["run", "cpr_grokking", "--storage", str(storage), *ARGS]

    def trial_dirs() -> list[Path]:
        return sorted(p.parent for p in stage.glob("*/params.json"))

    def saved_by_tune(trial: Path) -> bool:  # Tune's experiment state knows the trial (a restore continues it)
        return any(trial.name.rsplit("_", 1)[1] in f.read_text(errors="replace")
                   for f in stage.glob("experiment_state-*.json"))

    # 1. SIGKILL the driver once a trial's Train run has checkpointed step 50 of 150 (mid-trial)
    first = Driver(args, tmp_path / "run1.log")
    _wait_for(lambda: any(_snapshot_step(t) == 50 and saved_by_tune(t) for t in trial_dirs()), 600,
              "a checkpoint at step 50", first)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    out1 = first.output()
    assert "Ray Train run" in out1 and "2 workers" in out1

    # 2. the same command: the experiment is restored, the interrupted trial's workers resume mid-trial
    second = Driver(args, tmp_path / "run2.log")
    assert second.wait(900) == 0, second.output()[-3000:]
    out2 = second.output()
    assert "[stage1] resuming the interrupted experiment" in out2
    # every worker group found its CPUs: none waited out Ray Train's start-up timeout (a group left reserved by
    # a stopped trial would make the next one wait for it)
    stuck = [line for line in (out1 + out2).splitlines() if "worker group startup timed out" in line]
    assert not stuck, stuck[:3]
    resumed = {int(m) for m in re.findall(r"resumed at step (\d+) on 2 workers", out2)}
    assert resumed and resumed <= {50, 100}, out2[-3000:]  # from a checkpoint, not from 0, not after the end

    trials = pd.read_parquet(sdir / "trials.parquet")
    layout = {str(p.relative_to(sdir)): [r["step"] for r in _rows(p)] for p in sdir.glob("tune/**/result.json")}
    notes = [line for line in out2.splitlines() if any(w in line for w in ("resum", "setting aside", "Error"))]
    assert len(trials) == 3 and trials["trial_id"].is_unique, (layout, notes[-20:])
    assert sorted(trials["cell"]) == ["adam_rescale", "adamcpr", "adamw"]
    assert set(trials["status"]) == {"completed"} and (trials["config/workers"] == 2).all()
    curves = pd.read_parquet(sdir / "curves.parquet")
    assert not curves.duplicated(["trial_id", "step"]).any()
    # a report Tune had not written to the study's storage when the driver died is lost from Tune's files (as for
    # one-process trials); the resumed trial reports on from its checkpoint
    steps = curves.groupby("trial_id")["step"].apply(set)
    assert all(s <= {50, 100, 150} and 150 in s for s in steps), steps
    assert sum(s == {50, 100, 150} for s in steps) >= 2, steps

    # the 2-worker trials (one of them killed and resumed) follow one process with the same global batch
    torch.set_num_threads(1)
    for tdir in trial_dirs():
        params = json.loads((tdir / "params.json").read_text())
        config = {k: v for k, v in params.items() if not k.startswith("__")}
        rows = {int(r["step"]): r for r in _rows(tdir / "result.json")}
        assert 150 in rows, (tdir.name, sorted(rows))
        for report in Run(params["__method"], {**config, "workers": 1}).reports():
            if report["step"] not in rows:  # lost with the killed driver (above)
                continue
            got = rows[report["step"]]
            # float32 round-off, grown over 150 Adam steps (<1e-4): far below what a wrong average would do
            for key, tol in (("train/loss", 1e-3), ("val/loss", 1e-3), ("val/accuracy", 0.01)):
                assert abs(got[key] - report[key]) <= tol * max(1.0, abs(report[key])), (tdir.name, key, got[key],
                                                                                         report[key])

    uri = f"sqlite:///{sdir / 'mlflow.db'}"
    parents, children = mlflow_runs(uri, "regtune/cpr_grokking")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(c.data.tags["trial_id"] for c in children) == sorted(trials["trial_id"])  # once each
    assert {c.info.status for c in children} == {"FINISHED"}
