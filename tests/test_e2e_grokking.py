"""End to end on real local Ray, Optuna, and a real sqlite MLflow store: the
cpr_grokking smoke study, and a user's own search with a trainable from the README."""

import subprocess
import sys
import textwrap

import pandas as pd
import pytest

from tests.conftest import ROOT, check_confirm, cli_env, mlflow_runs, run_cli

METHODS = {"adamw", "adam_rescale", "adamcpr"}


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
    storage = tmp_path_factory.mktemp("results")
    proc = run_cli("run", "cpr_grokking", "--scale", "smoke", "--storage", str(storage), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return storage / "cpr_grokking-smoke", proc


def test_trials_parquet_has_one_row_per_trial(smoke_study):
    sdir, _ = smoke_study
    trials = pd.read_parquet(sdir / "trials.parquet")
    assert set(trials["method"]) == METHODS
    assert trials["trial_id"].is_unique
    search = trials[trials["phase"] == "search"]
    assert (search.groupby("method").size() == 2).all()  # smoke: 2 search trials per cell
    assert set(trials["status"]) <= {"completed", "stopped"}
    assert (trials.loc[trials["status"] == "completed", "steps"] == 300).all()
    for col in ("config/lr", "config/seed", "final/val/accuracy", "best/val/accuracy", "seconds", "steps_to_threshold"):
        assert col in trials
    assert (search["config/seed"] == 0).all()  # the search's one seed (--seed 0)
    check_confirm(trials, (sdir / "report" / "report.md").read_text(), seeds=2)  # smoke: 2 fresh seeds per cell
    curves = pd.read_parquet(sdir / "curves.parquet")
    assert set(curves["trial_id"]) == set(trials["trial_id"])
    assert not curves.duplicated(["trial_id", "step"]).any()
    # the first Optuna point of each cell is the paper's setting
    adamw = search[search["method"] == "adamw"]
    assert ((adamw["config/lr"] == 1e-3) & (adamw["config/weight_decay"] == 0.1)).any()


def test_clean_logs(smoke_study):
    """A successful study prints no tracebacks and none of Ray's per-checkpoint lines (trainables/quiet.py)."""
    _, proc = smoke_study
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out and "Exception ignored" not in out, out[-4000:]
    assert "Checkpoint successfully created" not in out


def test_mlflow_runs_nested_under_one_parent(smoke_study):
    sdir, _ = smoke_study
    parents, children = mlflow_runs(f"sqlite:///{sdir / 'mlflow.db'}", "regtune/cpr_grokking")
    trials = pd.read_parquet(sdir / "trials.parquet")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == len(trials)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(c.data.tags["trial_id"] for c in children) == sorted(trials["trial_id"])
    phases = dict(zip(trials["trial_id"], trials["phase"]))
    assert all(c.data.tags["phase"] == phases[c.data.tags["trial_id"]] for c in children)  # search / confirm
    assert all(c.info.status == "FINISHED" for c in children)
    assert all("val/accuracy" in c.data.metrics for c in children)
    from mlflow.tracking import MlflowClient

    arts = MlflowClient(f"sqlite:///{sdir / 'mlflow.db'}").list_artifacts(parents[0].info.run_id, "report")
    assert {"report.md", "curves.png", "search_trace.png"} <= {a.path.split("/")[-1] for a in arts}


def test_report_has_a_row_per_method_and_a_plot(smoke_study):
    sdir, proc = smoke_study
    md = (sdir / "report" / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and "grokking" in line]
    assert {line.split("|")[3].strip() for line in rows} == METHODS
    assert "steps to val/accuracy >= 0.95" in md
    assert md.index("## Confirmed results per cell") < md.index("## Best configuration per cell (search, one seed)")
    for name in ("curves.png", "search_trace.png"):
        png = sdir / "report" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "mlflow ui --backend-store-uri sqlite:///" in proc.stdout  # the dashboard command is printed


def test_report_rebuilds_from_parquet_alone(smoke_study, tmp_path):
    sdir, _ = smoke_study
    (sdir / "report" / "report.md").unlink()
    proc = run_cli("report", "cpr_grokking", "--scale", "smoke", "--storage", str(sdir.parent), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "adamcpr" in (sdir / "report" / "report.md").read_text()


def test_users_own_search_with_a_trainable(tmp_path):
    script = textwrap.dedent(f"""
        from ray import tune
        import trainables
        tuner = tune.Tuner(
            trainables.get("adamcpr"),
            param_space={{**trainables.space("adamcpr"), "task": "grokking", "size": "smoke", "steps": 40,
                          "eval_every": 20, "lr": tune.loguniform(1e-4, 1e-2), "kappa_init_method": "warm_start",
                          "kappa_init_param": tune.randint(5, 30)}},
            tune_config=tune.TuneConfig(metric="val/accuracy", mode="max", num_samples=2),
            run_config=tune.RunConfig(storage_path="{tmp_path}", verbose=0),
        )
        grid = tuner.fit()
        assert not grid.errors, grid.errors
        best = grid.get_best_result()
        print("STEPS", best.metrics["step"], "KAPPA", best.config["kappa_init_param"])
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "STEPS 40" in proc.stdout
