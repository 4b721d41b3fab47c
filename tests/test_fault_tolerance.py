"""Fault tolerance on real Ray, Optuna and MLflow: a trial whose process dies is retried from its checkpoint and
ends exactly where an uninterrupted run ends; a driver killed (SIGKILL) and then interrupted (SIGINT) mid-search,
and killed again mid-confirm, resumes with every trial once in Parquet and MLflow; bad storage or data fails fast;
checkpoints never unpickle code; one driver per study directory."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from regtune.results import read_jsonl
from studies.engine.guard import DriverLock, session_processes
from tests.conftest import ROOT, cli_env, mlflow_runs, run_cli

CURVE_KEYS = ("step", "train/loss", "train/accuracy", "val/loss", "val/accuracy", "lr", "best/val/accuracy",
              "best/step")


def _rows(result_json: Path) -> list[dict]:
    return read_jsonl(result_json)  # Tune may be writing the last line


def _by_step(rows: list[dict]) -> dict[int, dict]:
    return {int(r["step"]): r for r in rows}  # a retried trial may repeat steps: the last one counts


def test_read_jsonl_tolerates_a_line_being_written_and_a_line_cut_by_a_crash(tmp_path):
    f = tmp_path / "result.json"
    assert read_jsonl(f) == []  # not there yet
    f.write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/loss": 1.5}\n{"step": 3, "train/loss": 1.')
    assert [r["step"] for r in read_jsonl(f)] == [1, 2]  # the last line is still being written
    with f.open("a") as out:
        out.write('2}\n')
    assert [r["step"] for r in read_jsonl(f)] == [1, 2, 3]
    with f.open("a") as out:  # a writer killed mid-line, then a resumed one appending
        out.write('{"step": 4, "train/lo' + '{"step": 4, "train/loss": 1.1}\n{"step": 5, "train/loss": 1.0}\n')
    assert [r["step"] for r in read_jsonl(f)] == [1, 2, 3, 5]


# ---------------------------------------------------------------------------------------------- trial retry
def test_trial_killed_mid_run_resumes_from_checkpoint_bit_for_bit(tmp_path):
    """fail_at_step makes the trial's process os._exit once past step 75 (at step 100, before reporting it: the
    steps since the step-75 checkpoint are lost); FailureConfig retries it from that checkpoint; every reported
    metric equals the uninterrupted twin's (same config and seed), and result.json has every step, the step-75
    row the driver logged before the process died included (trainables.ray_internals, as in a study)."""
    import ray
    from ray import tune

    import trainables
    from trainables.ray_internals import loggers

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        tuner = tune.Tuner(
            tune.with_resources(trainables.get("adamw"), {"cpu": 1}),
            param_space={"task": "grokking", "size": "smoke", "steps": 150, "eval_every": 25, "seed": 3,
                         "lr": 1e-3, "weight_decay": 0.1, "fail_at_step": tune.grid_search([None, 75])},
            tune_config=tune.TuneConfig(max_concurrent_trials=2),
            run_config=tune.RunConfig(name="retry", storage_path=str(tmp_path), verbose=0, callbacks=loggers(),
                                      failure_config=tune.FailureConfig(max_failures=1),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
        )
        results = tuner.fit()
    finally:
        ray.shutdown()
    assert len(results) == 2 and all(r.error is None for r in results)
    by_fail = {r.config["fail_at_step"]: Path(r.path) for r in results}
    clean, died = by_fail[None], by_fail[75]
    assert (died / ".fail_at_step_done").exists() and not (clean / ".fail_at_step_done").exists()
    died_rows = _rows(died / "result.json")
    restarted = [r for r in died_rows if r["iterations_since_restore"] == 1]
    # the retry continued from a checkpoint (first report after it is past step 25), it did not start over
    assert len(restarted) == 2 and restarted[1]["step"] > 25, [(r["step"], r["iterations_since_restore"])
                                                                for r in died_rows]
    a, b = _by_step(_rows(clean / "result.json")), _by_step(died_rows)
    assert sorted(a) == sorted(b) == [25, 50, 75, 100, 125, 150]
    for step in a:
        for key in CURVE_KEYS:
            assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])


def test_a_retried_trial_keeps_the_rows_its_driver_logged_before_the_storage_copy_caught_up(tmp_path):
    """On a retry Tune copies the trial's result.json from storage over the driver's staging file; the storage copy
    is an older snapshot (synced in the background), so Tune's own logger loses the newest rows. Ours keeps them,
    and still restores from storage for a new driver (Tuner.restore: no staging file)."""
    from types import SimpleNamespace

    import pyarrow.fs
    from ray.tune.logger import JsonLoggerCallback

    from trainables.ray_internals import ProgressCsvLogger, ResultJsonLogger

    rows = [json.dumps({"step": s}) + "\n" for s in (25, 50, 75)]
    staging, storage = tmp_path / "staging", tmp_path / "storage"
    storage.mkdir()
    (storage / "result.json").write_text("".join(rows[:2]))  # the last sync ran before step 75 was logged
    trial = SimpleNamespace(checkpoint=object(), local_path=str(staging),
                            storage=SimpleNamespace(trial_fs_path=str(storage),
                                                    storage_filesystem=pyarrow.fs.LocalFileSystem()))
    for logger, kept in ((JsonLoggerCallback(), [25, 50]), (ResultJsonLogger(), [25, 50, 75])):
        staging.mkdir(exist_ok=True)
        (staging / "result.json").write_text("".join(rows))
        logger._restore_from_remote("result.json", trial)
        assert [r["step"] for r in read_jsonl(staging / "result.json")] == kept, type(logger).__name__
    for logger in (ResultJsonLogger(), ProgressCsvLogger()):  # a new driver: its staging dir is empty
        (staging / "result.json").unlink()
        logger._restore_from_remote("result.json", trial)
        assert [r["step"] for r in read_jsonl(staging / "result.json")] == [25, 50]


# ------------------------------------------------------------------------------- driver killed / interrupted
class Driver:
    """``python -m studies run ...`` as a background process whose output goes to a file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None):
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "studies", *args], cwd=ROOT, env=env or cli_env(),
                                     stdout=log.open("w"), stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"driver did not finish in {timeout}s:\n{self.output()[-3000:]}") from None


def _wait_for(cond, timeout: float, what: str, driver: Driver) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if driver.proc.poll() is not None:
            raise AssertionError(f"driver exited ({driver.proc.returncode}) before {what}:\n{driver.output()[-3000:]}")
        time.sleep(0.2)
    driver.proc.kill()
    raise AssertionError(f"timed out waiting for {what}:\n{driver.output()[-3000:]}")


def _steps(tdir: Path) -> list[int]:
    f = tdir / "result.json"
    return [r["step"] for r in _rows(f)] if f.exists() else []


def _trial_dirs(exp_dir: Path) -> list[Path]:
    return sorted(p.parent for p in exp_dir.glob("*/params.json"))


def test_driver_sigkill_then_sigint_then_resume(tmp_path):
    """Four runs of one command. The study's three cells run in one Tune experiment (stage1), one trial at a
    time, round-robin over the cells: the first three trials are each the first of their cell, alone at their
    ASHA rung (grace 100 of 300 steps), so they are never stopped and run to step 300. Then the confirm stage
    (stage_confirm: each cell's best config with 2 fresh seeds) is killed mid-trial and resumed."""
    storage = tmp_path / "results"
    sdir = storage / "cpr_grokking-smoke"
    stage = sdir / "tune" / "stage1"
    confirm = sdir / "tune" / "stage_confirm"
    args = ["run", "cpr_grokking", "--scale", "smoke", "--storage", str(storage),
            "--num-samples", "2", "--max-concurrent", "1"]

    def steps() -> list[list[int]]:
        return [_steps(t) for t in _trial_dirs(stage)]

    # 1. SIGKILL when two trials are done and the third is past step 150 (Tune saves its experiment state every
    #    second checkpoint of a trial, so the state knows a checkpoint of that trial)
    first = Driver(args, tmp_path / "run1.log")
    _wait_for(lambda: len([s for s in steps() if 300 in s]) == 2
              and any(150 <= max(s, default=0) < 300 for s in steps()),
              240, "two finished trials and a running third", first)
    session = json.loads((sdir / "driver.lock").read_text())["ray_session"]
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    time.sleep(1.0)
    leftover = session_processes(session)  # local Ray dies with its driver, but its agents linger for a minute

    # 2. the same command resumes the running trial from its checkpoint; SIGINT (Ctrl-C) it once a fifth trial
    #    has reported (one at a time: the first four are over, finished or stopped by ASHA)
    second = Driver(args, tmp_path / "run2.log")
    _wait_for(lambda: len([s for s in steps() if s]) >= 5, 240, "a fifth trial's first report", second)
    second.proc.send_signal(signal.SIGINT)
    assert second.wait(120) == 130, second.output()[-3000:]
    out2 = second.output()
    assert "run the same command again to resume" in out2
    if leftover:
        assert "leftover Ray processes of the previous driver" in out2, leftover  # (some may have died by then)
    assert session_processes(session) == []  # nothing of the killed driver's local Ray is left
    assert "[stage1] resuming the interrupted experiment" in out2
    resumed = [int(line.rsplit(" ", 1)[1]) for line in out2.splitlines() if "] resumed at step" in line]
    assert resumed and resumed[0] >= 100, resumed  # continued from a checkpoint past the rung, not from step 0
    assert not (stage / "stage_done.json").exists()  # interrupted is not done
    parents, _ = mlflow_runs(f"sqlite:///{sdir / 'mlflow.db'}", "regtune/cpr_grokking")
    assert [p.info.status for p in parents] == ["KILLED"]
    finished = {t.name: (t / "result.json").read_bytes() for t in _trial_dirs(stage) if 300 in _steps(t)}
    assert len(finished) >= 3

    # 3. the same command again: the experiment is restored and the search ends; the confirm stage starts.
    #    SIGKILL when a confirm trial is done and the next is past step 150 (Tune has a restorable state)
    def confirm_steps() -> list[list[int]]:
        return [_steps(t) for t in _trial_dirs(confirm)]

    third = Driver(args, tmp_path / "run3.log")
    _wait_for(lambda: any(300 in s for s in confirm_steps()) and any(150 <= max(s, default=0) < 300
                                                                     for s in confirm_steps()),
              300, "a finished confirm trial and a running second", third)
    third.proc.send_signal(signal.SIGKILL)
    third.proc.wait()
    assert "[stage1] resuming the interrupted experiment" in third.output()
    assert (stage / "stage_done.json").exists() and not (confirm / "stage_done.json").exists()
    for name, before in finished.items():  # a trial finished before the interruption did not run again
        assert (stage / name / "result.json").read_bytes() == before, name
    confirmed = {t.name: (t / "result.json").read_bytes() for t in _trial_dirs(confirm) if 300 in _steps(t)}

    # 4. the same command again: the search is skipped, the confirm stage is restored, the study ends
    fourth = Driver(args, tmp_path / "run4.log")
    assert fourth.wait(300) == 0, fourth.output()[-3000:]
    out4 = fourth.output()
    assert "[stage1] already finished, skipping" in out4
    assert "[stage_confirm] resuming the interrupted experiment" in out4
    for name, before in confirmed.items():  # a finished confirm trial did not run again
        assert (confirm / name / "result.json").read_bytes() == before, name

    trials = pd.read_parquet(sdir / "trials.parquet")
    search, conf = trials[trials["phase"] == "search"], trials[trials["phase"] == "confirm"]
    assert trials["trial_id"].is_unique and len(search) == 6 and len(conf) == 6
    assert (search.groupby("cell").size() == 2).all()
    assert set(trials["status"]) <= {"completed", "stopped"}
    # confirm: each cell's best full-budget search trial, 2 fresh seeds, full budget, once each
    assert (conf.groupby("cell")["config/seed"].nunique() == 2).all() and conf["cell"].nunique() == 3
    assert not set(conf["config/seed"]) & set(search["config/seed"])
    assert not conf.duplicated(["cell", "confirms", "config/seed"]).any()
    assert (conf["status"] == "completed").all() and (conf["steps"] == 300).all()
    full = search[search["full_budget"]].set_index("trial_id")["cell"]
    assert all(full[t] == c for t, c in zip(conf["confirms"], conf["cell"]))
    curves = pd.read_parquet(sdir / "curves.parquet")
    assert not curves.duplicated(["trial_id", "step"]).any()
    owned = {t.name for t in _trial_dirs(stage) + _trial_dirs(confirm)}
    assert owned == {f"{c}_{t}" for c, t in zip(trials["cell"], trials["trial_id"])}

    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{sdir / 'mlflow.db'}"
    parents, children = mlflow_runs(uri, "regtune/cpr_grokking")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(c.data.tags["trial_id"] for c in children) == sorted(trials["trial_id"])  # once each
    assert sorted(c.data.tags["trial_id"] for c in children if c.data.tags["phase"] == "confirm") == \
        sorted(conf["trial_id"])
    assert {c.info.status for c in children} == {"FINISHED"}
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("regtune/cpr_grokking")
    everything = client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=1000)
    assert not [r.info.run_id for r in everything if r.info.status == "RUNNING"]  # no orphans, deleted or not


# -------------------------------------------------------------------------------------------------- fail fast
@pytest.mark.parametrize("storage, message", [
    ("gs://bucket/regtune", "--storage 'gs://bucket/regtune' is not allowed: expected a directory or s3://bucket/prefix"),
    ("FILE/sub", "is not writable (Not a directory)"),
], ids=["gs-uri", "storage-under-a-file"])  # s3:// storage: tests/test_e2e_s3.py
def test_bad_storage_fails_fast_with_exit_2(storage, message, tmp_path):
    (tmp_path / "FILE").write_text("not a directory")
    storage = storage.replace("FILE", str(tmp_path / "FILE"))
    proc = run_cli("run", "cpr_grokking", "--scale", "smoke", "--storage", storage, timeout=120)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert "Ray" not in proc.stdout + proc.stderr  # before Ray started


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any permission bits")
def test_read_only_storage_fails_fast(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    proc = run_cli("run", "cpr_grokking", "--scale", "smoke", "--storage", str(ro), timeout=120)
    assert proc.returncode == 2 and "is not writable (Permission denied)" in proc.stderr


def test_missing_data_dir_fails_before_ray(tmp_path):
    import ray

    from regtune.space import ConfigError
    from studies.engine.driver import run_study
    from studies.spec import Cell, Scale, Study

    missing = tmp_path / "no-such-data"
    study = Study(name="needs_data", doc="", paper="", cells=(Cell("sgd", "cifar10_resnet18", "sgd"),),
                  scales={"smoke": Scale(num_samples=1, fixed={"size": "smoke", "data_dir": str(missing)})},
                  default_scale="smoke")
    with pytest.raises(ConfigError, match=r"data_dir='.*no-such-data' of cell 'sgd' is not a directory"):
        run_study(study, "smoke", storage=str(tmp_path / "results"))
    assert not ray.is_initialized()
    assert not (tmp_path / "results").exists()  # nothing written


def test_second_driver_on_the_same_study_dir_exits_2(tmp_path):
    sdir = tmp_path / "results" / "cpr_grokking-smoke"
    sdir.mkdir(parents=True)
    lock = DriverLock(sdir).acquire()  # this test process plays the running driver
    try:
        proc = run_cli("run", "cpr_grokking", "--scale", "smoke", "--storage", str(sdir.parent), timeout=120)
    finally:
        lock.release()
    assert proc.returncode == 2
    assert f"in use by another driver (pid {os.getpid()}" in proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------------- checkpoints
class Payload:
    """Unpickling this runs code (creates a file): what a tampered checkpoint could do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_checkpoints_load_weights_only(tmp_path):
    from regtune.loop import Run
    from trainables import CHECKPOINT_FILE, load_checkpoint

    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    run = Run("adamcpr", {"task": "grokking", "size": "smoke", "steps": 4, "eval_every": 2})
    for _ in run.reports():
        pass
    torch.save(run.state_dict(), good / CHECKPOINT_FILE)
    state = load_checkpoint(good)
    resumed = Run("adamcpr", {"task": "grokking", "size": "smoke", "steps": 4, "eval_every": 2})
    resumed.load_state_dict(state)
    assert resumed.step == 4
    marker = tmp_path / "code-ran"
    torch.save({"step": 1, "model": Payload(str(marker))}, bad / CHECKPOINT_FILE)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(bad)
    assert not marker.exists()


def test_tune_retention_deletes_a_checkpoint_only_after_state_without_it_is_on_storage(tmp_path, monkeypatch):
    """Ray's own order, on Ray's real classes: the trial's checkpoint manager deletes the checkpoint it drops at
    once, while the experiment state on storage (what a resumed driver restores) still names it. After the
    studies' wrapper the drop waits for the next experiment-state save, is deleted once that state's upload has
    finished, and a checkpoint that is already gone is skipped instead of raising."""
    import pyarrow.fs
    from ray import tune
    from ray.train import Checkpoint
    from ray.train._internal import checkpoint_manager
    from ray.train._internal.session import _TrainingResult
    from ray.train._internal.storage import StorageContext
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    from trainables import ray_internals

    monkeypatch.setattr(_ExperimentCheckpointManager, "sync_up_experiment_state",  # the wrapper's patch is undone
                        _ExperimentCheckpointManager.sync_up_experiment_state)  # after the test (the delete's below)
    # the driver's staging dir lives in the Ray session dir; here (no Ray started) a dir of the test's
    monkeypatch.setattr(StorageContext, "experiment_driver_staging_path", str(tmp_path / "staging"))
    fs = pyarrow.fs.LocalFileSystem()
    storage = StorageContext(storage_path=str(tmp_path / "storage"), experiment_dir_name="exp")
    state = Path(storage.experiment_fs_path) / "experiment_state.json"
    deletes, ray_delete = [], checkpoint_manager._delete_fs_path  # (checkpoint, state on storage) at each delete

    def delete(fs, fs_path: str) -> None:
        deletes.append((Path(fs_path).name, state.read_text()))
        ray_delete(fs=fs, fs_path=fs_path)

    monkeypatch.setattr(checkpoint_manager, "_delete_fs_path", delete)

    def checkpoint(i: int) -> _TrainingResult:
        d = Path(storage.experiment_fs_path) / "trial" / f"checkpoint_{i:06d}"
        d.mkdir(parents=True)
        (d / "state.pt").write_bytes(b"x")
        return _TrainingResult(checkpoint=Checkpoint(str(d), filesystem=fs), metrics={"step": i})

    def save_naming(i: int):  # what Tune's save_fn does: write the state into the driver's staging dir
        def save() -> None:
            Path(storage.experiment_driver_staging_path).mkdir(parents=True, exist_ok=True)
            (Path(storage.experiment_driver_staging_path) / "experiment_state.json").write_text(str(i))
        return save

    trial = checkpoint_manager._CheckpointManager(tune.CheckpointConfig(num_to_keep=1))
    experiment = _ExperimentCheckpointManager(storage=storage, checkpoint_period=1e9)
    first = checkpoint(0)
    trial.register_checkpoint(first)
    experiment.sync_up_experiment_state(save_naming(0), force=True, wait=True)
    trial.register_checkpoint(checkpoint(1))
    assert not Path(first.checkpoint.path).exists() and state.read_text() == "0"  # Ray: the state names a gone one

    ray_internals.safe_checkpoint_retention()
    second = checkpoint(2)
    trial.register_checkpoint(second)
    trial.register_checkpoint(checkpoint(3))
    assert Path(second.checkpoint.path).exists()  # dropped: kept until a state without it is on storage
    experiment.sync_up_experiment_state(save_naming(3))  # inside the period: no save, nothing deleted
    assert Path(second.checkpoint.path).exists() and state.read_text() == "0"
    ray_internals._dropped.append((fs, str(tmp_path / "gone" / "checkpoint_000009")))  # a killed driver deleted it
    experiment.sync_up_experiment_state(save_naming(3), force=True)  # Tune does not wait for this upload itself
    assert state.read_text() == "3" and not Path(second.checkpoint.path).exists()
    assert ray_internals._dropped == []
    assert deletes == [("checkpoint_000000", "0"), ("checkpoint_000001", "3"), ("checkpoint_000002", "3")]
    assert sorted(p.name for p in (Path(storage.experiment_fs_path) / "trial").iterdir()) == ["checkpoint_000003"]
