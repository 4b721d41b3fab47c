"""A real `mlflow server` killed mid-study: the study finishes and says so once; after the server is back the
next `studies run` backfills every missing run from the Parquet tables, and `studies sync-mlflow` adds none."""

import subprocess
import sys
import time

import pandas as pd
import pytest

from studies.engine.mlflow_server import server_command, stop, wait_ready
from tests.conftest import ROOT, cli_env, run_cli
from tests.test_preflight import free_port

EXPERIMENT = "regtune/cpr_grokking"


def start_server(store, port):
    store.mkdir(exist_ok=True)
    (store / "mlartifacts").mkdir(exist_ok=True)
    with open(store / "server.log", "ab") as log:
        proc = subprocess.Popen(server_command(store, "127.0.0.1", port), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=log)
    wait_ready(f"http://127.0.0.1:{port}", proc, timeout=180)
    return proc


def child_runs(db):
    """Trial runs of the study in the server's sqlite store, read directly (the server may be down)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return client, None, []
    runs = client.search_runs([exp.experiment_id], max_results=10000)
    return client, exp, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


@pytest.fixture(scope="module")
def outage(tmp_path_factory):
    root = tmp_path_factory.mktemp("outage")
    store, storage, port = root / "server", root / "results", free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(store, port)
    out = open(root / "study.log", "w+")
    study = subprocess.Popen([sys.executable, "-m", "studies", "run", "cpr_grokking", "--scale", "smoke",
                              "--storage", str(storage), "--mlflow-uri", uri],
                             cwd=ROOT, env=cli_env(), stdout=out, stderr=subprocess.STDOUT)
    servers = [server]
    try:
        # a failure-only bound: on a loaded 2-core machine the study's start (imports, local Ray) alone took 15 min
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline and study.poll() is None and not child_runs(store / "mlflow.db")[2]:
            time.sleep(0.2)
        if study.poll() is not None or not child_runs(store / "mlflow.db")[2]:  # ended, or the bound ran out
            ended = f"ended ({study.returncode})" if study.poll() is not None else "ran 1800 s"
            out.seek(0)
            raise AssertionError(f"the study {ended} before its first trial run reached MLflow:\n"
                                 f"{out.read()[-6000:]}\n--- server log:\n{(store / 'server.log').read_text()[-2000:]}")
        stop([server], grace=0)  # SIGKILL the server's process group: MLflow is gone mid-study
        logged_before = len(child_runs(store / "mlflow.db")[2])
        try:  # a failure-only bound: the smoke study (12 trials) took over 15 min at a load of 25 on 2 cores
            study.wait(timeout=1800)
        except subprocess.TimeoutExpired:
            out.seek(0)
            raise AssertionError(f"the study did not finish within 1800 s:\n{out.read()[-6000:]}") from None
        out.seek(0)
        first = out.read()
        assert study.returncode == 0, first[-4000:]
        _, _, runs_after_outage = child_runs(store / "mlflow.db")
        servers.append(start_server(store, port))  # back, same store
        rerun = run_cli("run", "cpr_grokking", "--scale", "smoke", "--storage", str(storage), "--mlflow-uri", uri,
                        timeout=900)
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
        _, _, runs_after_rerun = child_runs(store / "mlflow.db")
        sync = run_cli("sync-mlflow", "cpr_grokking", "--scale", "smoke", "--storage", str(storage),
                       "--mlflow-uri", uri, timeout=300)
        assert sync.returncode == 0, sync.stdout[-3000:] + sync.stderr[-3000:]
        yield {"first": first, "rerun": rerun, "sync": sync, "logged_before": logged_before,
               "after_outage": runs_after_outage, "after_rerun": runs_after_rerun, "store": store,
               "sdir": storage / "cpr_grokking-smoke"}
    finally:
        if study.poll() is None:
            study.kill()
            study.wait()
        stop(servers)
        out.close()


def test_study_finishes_and_says_so_once(outage):
    first = outage["first"]
    assert first.count("is unreachable") == 1, first[-4000:]
    assert "the study keeps training" in first
    assert "Traceback" not in first and "Exception ignored" not in first
    trials = pd.read_parquet(outage["sdir"] / "trials.parquet")
    assert (trials["phase"] == "search").sum() == 6 and (trials["phase"] == "confirm").sum() == 6  # every trial
    # trained, MLflow or not: 2 search trials a cell, then 2 confirm seeds of each cell's best
    finished = [r for r in outage["after_outage"] if r.info.status == "FINISHED"]
    assert len(finished) < len(trials), "the server was killed too late to miss any run: the test proved nothing"


def test_rerun_backfills_every_missing_run_once(outage):
    trials = pd.read_parquet(outage["sdir"] / "trials.parquet")
    curves = pd.read_parquet(outage["sdir"] / "curves.parquet")
    assert "backfilled" in outage["rerun"].stdout + outage["rerun"].stderr
    runs = outage["after_rerun"]
    ids = [r.data.tags["trial_id"] for r in runs]
    assert sorted(ids) == sorted(trials["trial_id"]), "one run per trial, no duplicates"
    assert len({r.data.tags["mlflow.parentRunId"] for r in runs}) == 1
    assert all(r.info.status == "FINISHED" for r in runs)
    client, exp, _ = child_runs(outage["store"] / "mlflow.db")
    backfilled = [r for r in runs if r.data.tags.get("regtune.backfilled") == "true"]
    assert backfilled, "no run was missing: nothing was backfilled"
    for r in runs:
        row = trials[trials["trial_id"] == r.data.tags["trial_id"]].iloc[0]
        assert (r.data.tags["cell"], r.data.tags["method"], r.data.tags["task"]) == (row.cell, row.method, row.task)
        assert r.data.tags["phase"] == row.phase
        assert float(r.data.params["lr"]) == pytest.approx(row["config/lr"])
        history = client.get_metric_history(r.info.run_id, "val/accuracy")
        expected = curves[(curves["trial_id"] == row.trial_id) & curves["val/accuracy"].notna()]
        assert sorted(m.step for m in history) == sorted(expected["step"])  # every step, none twice
        assert sorted(m.value for m in history) == pytest.approx(sorted(expected["val/accuracy"]))
    parents = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"


def test_sync_again_adds_nothing(outage):
    assert "0 trial runs backfilled, 0 completed" in outage["sync"].stdout
    _, _, runs = child_runs(outage["store"] / "mlflow.db")
    assert len(runs) == len(outage["after_rerun"])


def test_a_server_gone_mid_response_counts_as_unreachable():
    """mlflow's http_request re-raises any request failure as MlflowException in the failure's context; a server
    killed while answering breaks the response (ChunkedEncodingError around IncompleteRead): an outage, not a bad
    request. A refused request (the server's own error) is not."""
    import http.client

    import requests
    import urllib3
    from mlflow.exceptions import MlflowException

    from studies.engine.tracking import is_connection_error

    def raised(cause: BaseException) -> BaseException:
        try:
            try:
                raise cause
            except Exception as e:  # the way mlflow.utils.rest_utils.http_request wraps it
                raise MlflowException(f"API request failed with exception {e}")  # noqa: B904
        except MlflowException as wrapped:
            return wrapped

    broken = requests.exceptions.ChunkedEncodingError(urllib3.exceptions.ProtocolError(
        "Connection broken: IncompleteRead(0 bytes read, 1406 more expected)", http.client.IncompleteRead(b"", 1406)))
    assert is_connection_error(raised(broken))
    assert is_connection_error(raised(requests.exceptions.ConnectionError("refused")))
    assert not is_connection_error(raised(ValueError("INVALID_PARAMETER_VALUE")))
    assert not is_connection_error(MlflowException("RESOURCE_ALREADY_EXISTS"))


def test_a_param_reads_the_same_after_a_resume():
    """Tune restores a trial's config from JSON: a recipe's tuple comes back a list. MLflow refuses a param logged
    again with another text, so both must read the same (and the same as the Parquet backfill's JSON text)."""
    import json

    from studies.engine.tracking import param_text

    assert param_text((0.9, 0.98)) == param_text([0.9, 0.98]) == json.dumps([0.9, 0.98])
    assert param_text(1e-3) == "0.001" and param_text("dependent") == "dependent"
