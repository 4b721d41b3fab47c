"""A trial that fails on a configuration or data error is not retried and stops its cell; a crash is still
retried. Local Ray, real Optuna / ASHA and a real sqlite MLflow store (``studies.engine.driver.run_study``)."""

from __future__ import annotations

import json

import pytest

from regtune.data.cifar import write_fake_cifar
from regtune.space import ConfigError
from studies.spec import Cell, Scale, Study
from tests.conftest import mlflow_runs
from trainables.permanent import PERMANENT_KEY, is_permanent


def test_permanent_errors_are_config_and_data_errors():
    from regtune.data.text import MissingTokensError

    assert is_permanent(ConfigError("x")) and is_permanent(MissingTokensError("y"))
    assert not is_permanent(RuntimeError("CUDA out of memory")) and not is_permanent(FileNotFoundError("z"))


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    """Two cells, two trials each, max_failures=2, one trial at a time: ``bad`` builds a ViT whose width its
    head count does not divide (a ConfigError only the built model raises, inside the trial); ``crash``
    trains grokking and its process dies once past step 15 (os._exit), which Tune retries from the checkpoint."""
    import ray

    from studies.engine.driver import run_study

    tmp = tmp_path_factory.mktemp("permanent")
    data = write_fake_cifar(tmp / "data", "cifar100", n_train=384, n_test=128)
    study = Study(
        name="permanent_errors", doc="", paper="",
        cells=(Cell("bad", "cifar100_vit_t", "adamw", space={"vit_heads": 3, "lr": 1e-3, "data_dir": str(data)}),
               Cell("crash", "grokking", "adamw", space={"fail_at_step": 15, "lr": 1e-3})),
        scales={"smoke": Scale(num_samples=2, fixed={"size": "smoke", "steps": 40, "eval_every": 10},
                               max_concurrent=1, max_failures=2, grace_fraction=1.0)},
        default_scale="smoke", resources=lambda task, scale: {"cpu": 1, "gpu": 0},
    )
    lines: list[str] = []
    try:
        sdir = run_study(study, "smoke", storage=str(tmp / "results"), confirm_seeds=0,  # the search only
                         log=lines.append)
    finally:
        ray.shutdown()
    return sdir, lines


def _trials(sdir):
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(sdir / "tune" / "stage1"))
    return {t.trial_id: t for t in analysis.trials}


def test_config_error_is_not_retried_and_stops_its_cell(study_run):
    sdir, lines = study_run
    trials = _trials(sdir)
    bad = [t for t in trials.values() if t.config["__extras"]["cell"] == "bad"]
    assert len(bad) == 1, "the cell got another trial after a configuration error"
    (trial,) = bad
    assert trial.status == "ERROR"
    assert trial.run_metadata.num_failures == 1  # one attempt: no retry
    error_txt = (sdir / "tune" / "stage1" / f"bad_{trial.trial_id}" / "error.txt").read_text()
    assert error_txt.count("Failure #") == 1 and "vit_dim=32 is not allowed" in error_txt
    assert PERMANENT_KEY in trial.last_result and "ConfigError" in trial.last_result[PERMANENT_KEY]
    said = [ln for ln in lines if ln.startswith("[bad] stopped:")]
    assert said and all(len(ln.splitlines()) == 1 for ln in said)
    assert "ConfigError: vit_dim=32 is not allowed" in said[0] and "not retried" in said[0]
    done = json.loads((sdir / "tune" / "stage1" / "stage_done.json").read_text())
    assert set(done["stopped"]) == {"bad"} and done["trials"] == 3


def test_crashes_are_still_retried_and_the_study_finishes(study_run):
    sdir, _ = study_run
    crash = [t for t in _trials(sdir).values() if t.config["__extras"]["cell"] == "crash"]
    assert len(crash) == 2
    # retried after the crash (at least once: with reused actors fail_at_step may fire once more) to the end
    assert all(t.status == "TERMINATED" and t.run_metadata.num_failures >= 1 for t in crash)
    assert all(t.last_result["step"] == 40 for t in crash)
    assert (sdir / "trials.parquet").exists() and (sdir / "report" / "report.md").exists()


def test_mlflow_marks_the_stopped_trial_failed(study_run):
    sdir, _ = study_run
    _, children = mlflow_runs(f"sqlite:///{sdir / 'mlflow.db'}", "regtune/permanent_errors")
    by_cell = {}
    for run in children:
        by_cell.setdefault(run.data.tags["cell"], []).append(run.info.status)
    assert by_cell == {"bad": ["FAILED"], "crash": ["FINISHED", "FINISHED"]}
