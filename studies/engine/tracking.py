"""MLflow tracking of a study: one parent run per study run, every trial nested.

All MLflow calls of the driver live here. Trials are logged by Ray's
``MLflowLoggerCallback`` on the driver (one writer, so an embedded sqlite store
is safe). Two things Ray's callback does not do, done here:

* nesting: every trial run carries ``mlflow.parentRunId`` = the study run;
* no duplicates on resume: the callback forgets its runs when a study is
  restored, so ``NestedMLflowCallback`` first looks the trial up by its
  ``trial_id`` tag under the parent and continues that run.

A tracking server that goes away during a study does not stop it: the first
connection error is reported once (``MLflowLink``), every later MLflow call of
the study is skipped, and the runs it missed are backfilled from the Parquet
tables at the end of the study (or of the next ``studies run`` of the same
study, or by ``studies sync-mlflow``; see ``studies.engine.mlflow_sync``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from mlflow.tracking import MlflowClient
from ray.air.integrations.mlflow import MLflowLoggerCallback

PARENT_FILE = "mlflow_parent.json"
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # MLflow 3: a model-training experiment
# a tracking server that is down costs seconds per call, not MLflow's minutes of retries (the user may override)
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def is_connection_error(e: BaseException) -> bool:
    """An MLflow call failed because the tracking server cannot be reached (not because of what was sent)."""
    import http.client

    import requests
    import urllib3

    # a server that went away mid-response (killed, restarted) breaks the connection: ChunkedEncodingError /
    # urllib3's ProtocolError around http.client's IncompleteRead or RemoteDisconnected
    lost = (requests.exceptions.ConnectionError, requests.exceptions.Timeout, requests.exceptions.ChunkedEncodingError,
            urllib3.exceptions.ProtocolError, http.client.IncompleteRead, http.client.RemoteDisconnected,
            ConnectionError, TimeoutError)
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, lost):
            return True
        e = e.__cause__ or e.__context__
    return False


class MLflowLink:
    """Whether the tracking server is reachable, as this study last saw it. The first connection error is
    reported once; from then on the study's MLflow calls are skipped (they would each wait for retries)."""

    def __init__(self, uri: str, log: Callable[[str], None] = _stderr, hint: str = ""):
        self.uri, self.log, self.hint = uri, log, hint
        self.offline = False

    def lost(self, e: BaseException) -> None:
        if not self.offline:
            self.offline = True
            cause = str(e).split("\n", 1)[0][:200]
            self.log(f"warning: MLflow at {self.uri} is unreachable ({cause}); the study keeps training without it. "
                     f"Its runs are backfilled from trials.parquet/curves.parquet at the end{self.hint}")

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, or None when the server is (or just went) unreachable."""
        if self.offline:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not is_connection_error(e):
                raise
            self.lost(e)
            return None

    def probe(self) -> bool:
        """After a loss: is the server back? (``GET /health``; sqlite stores are always there.)"""
        if self.uri.startswith(("http://", "https://")):
            from studies.engine.preflight_services import _http_get

            if _http_get(self.uri.rstrip("/") + "/health") is not None:
                return False
        self.offline = False
        return True


def default_tracking_uri(study_dir: Path) -> str:
    return f"sqlite:///{Path(study_dir).resolve() / 'mlflow.db'}"


def experiment_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table in the MLflow UI. The 3.x UI opens an experiment on its GenAI view unless
    the URL asks for the model-training one."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def experiment_links(store: Path, base: str) -> list[str]:
    """``name: URL`` of each study experiment in a study directory's sqlite store, for a server at ``base``."""
    client = MlflowClient(tracking_uri=default_tracking_uri(store))
    return [f"{e.name}: {experiment_url(base, e.experiment_id)}"
            for e in client.search_experiments(filter_string="name LIKE 'regtune/%'")]


def ui_command(uri: str, experiment_id: str | None = None) -> str:
    if uri.startswith("sqlite:"):
        cmd = f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
        return cmd + (f", then open {experiment_url('http://127.0.0.1:5000', experiment_id)}" if experiment_id else "")
    return f"open {uri} in a browser" + (f" (the study's runs: {experiment_url(uri, experiment_id)})" if experiment_id else "")


class StudyTracker:
    """The study's MLflow experiment and parent run (reused when a study resumes)."""

    def __init__(self, uri: str, experiment: str, study_dir: Path, tags: dict[str, str], *,
                 log: Callable[[str], None] = _stderr, reopen: bool = True):
        self.uri = uri
        self.experiment_name = experiment
        self.study_dir = Path(study_dir)
        self.tags = dict(tags)
        if uri.startswith(("http://", "https://")):
            for k, v in HTTP_ENV.items():
                os.environ.setdefault(k, v)
        hint = ""
        if tags.get("study") and tags.get("scale"):
            hint = (f" (if it is still down then: `python -m studies sync-mlflow {tags['study']} --scale {tags['scale']} "
                    f"--storage {self.study_dir.parent} --mlflow-uri {uri}`)")
        self.link = MLflowLink(uri, log, hint)
        self.log = log
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        # an embedded sqlite store keeps its artifacts next to it (else MLflow uses ./mlruns of the cwd);
        # a server decides itself (--artifacts-destination, proxied through the server)
        where = (Path(study_dir).resolve() / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment, where)
        if not exp or exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:  # the UI opens it on its runs
            self.client.set_experiment_tag(self.experiment_id, *EXPERIMENT_KIND)
        self.parent_id = self._parent_run(Path(study_dir), tags, reopen)

    def _parent_run(self, study_dir: Path, tags: dict[str, str], reopen: bool = True) -> str:
        marker = study_dir / PARENT_FILE
        if marker.exists():
            known = json.loads(marker.read_text())
            run_id = known.get(self.uri)
            if run_id:
                try:
                    self.client.get_run(run_id)
                    if reopen:
                        self.client.update_run(run_id, status="RUNNING")
                    return run_id
                except Exception:  # noqa: BLE001, S110 - store was replaced: start a new parent
                    pass
        else:
            known = {}
        run = self.client.create_run(self.experiment_id, run_name=tags.get("study_run", "study"), tags=tags)
        known[self.uri] = run.info.run_id
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, marker)
        return run.info.run_id

    def callback(self, stage: str, tags: dict[str, str]) -> NestedMLflowCallback:
        """The MLflow callback of one stage's experiment; each trial run is also tagged with its cell,
        method and task (from its config)."""
        cb = NestedMLflowCallback(
            tracking_uri=self.uri,
            experiment_name=self.experiment_name,
            tags={"mlflow.parentRunId": self.parent_id, "stage": stage, **tags},
        )
        cb.link = self.link
        return cb

    def log_artifacts(self, paths: list[Path], artifact_path: str = "report") -> None:
        for p in paths:
            self.link.call(self.client.log_artifact, self.parent_id, str(p), artifact_path=artifact_path)

    def log_params(self, params: dict[str, Any]) -> None:
        for k, v in params.items():
            try:
                self.link.call(self.client.log_param, self.parent_id, k, param_text(v))
            except Exception:  # noqa: BLE001 - same key logged by an earlier (resumed) run with another value
                self.link.call(self.client.set_tag, self.parent_id, f"param.{k}", str(v))

    def finish(self, status: str = "FINISHED") -> None:
        self.link.call(self.client.set_terminated, self.parent_id, status=status)

    def sync(self, study_dir: Path | None = None) -> None:
        """Backfill the runs MLflow missed (the server was away) from the study's Parquet tables."""
        from studies.engine.mlflow_sync import backfill

        if self.link.offline and not self.link.probe():
            self.log(f"warning: MLflow at {self.uri} is still unreachable: runs not backfilled{self.link.hint}")
            return
        created, completed = self.link.call(backfill, self, Path(study_dir or self.study_dir)) or (0, 0)
        if created or completed:
            self.log(f"MLflow: backfilled {created} missing trial runs and completed {completed} from the Parquet tables")

    def settle_runs(self, stage: str, statuses: dict[str, str]) -> None:
        self.link.call(self._settle_runs, stage, statuses)

    def _settle_runs(self, stage: str, statuses: dict[str, str]) -> None:
        """Make the stage's trial runs agree with Tune after a stage ends or restarts: a run whose trial is in
        ``statuses`` (trial_id -> FINISHED/FAILED) and still RUNNING is terminated with that status; a run of
        a trial Tune does not own (lost in a crash before Tune saved its state) is terminated and deleted."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_id}' and tags.stage = '{stage}'",
            max_results=10000,
        )
        for run in runs:
            status = statuses.get(run.data.tags.get("trial_id", ""))
            if status is None:
                if run.info.status == "RUNNING":
                    self.client.set_terminated(run.info.run_id, status="KILLED")
                self.client.delete_run(run.info.run_id)
            elif run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, status=status)

    def runs(self) -> list:
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_id}'", max_results=10000
        )


class NestedMLflowCallback(MLflowLoggerCallback):
    """Ray's MLflow callback with nested runs, at most one run per trial, metrics at the trial's own ``step``
    (as in curves.parquet), and a tracking server that may go away (``link``: reported once, then skipped)."""

    link: MLflowLink | None = None

    def _guarded(self, fn: Callable[..., Any], *args: Any) -> None:
        if self.link is None:
            self.link = MLflowLink(self.tracking_uri)
        self.link.call(fn, *args)

    def setup(self, *args, **kwargs) -> None:
        self._trial_runs = {}
        self._guarded(super().setup, *args)

    def log_trial_start(self, trial) -> None:
        self._guarded(self._start, trial)

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        self._guarded(self._result, trial, result)

    def log_trial_end(self, trial, failed: bool = False) -> None:
        run_id = self._trial_runs.get(trial)
        if run_id is not None:
            client = MlflowClient(tracking_uri=self.tracking_uri)
            self._guarded(client.set_terminated, run_id, "FAILED" if failed else "FINISHED")

    def _result(self, trial, result: dict) -> None:
        from mlflow.entities import Metric
        from ray.tune.utils import flatten_dict

        run_id = self._trial_runs.get(trial)
        if run_id is None:  # its start was missed (server away): the backfill creates it
            return
        step = int(result.get("step") or result.get("training_iteration") or 0)
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in flatten_dict(result, delimiter="/").items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)]
        client = MlflowClient(tracking_uri=self.tracking_uri)
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit
            client.log_batch(run_id, metrics=metrics[i:i + 1000], synchronous=True)

    def _start(self, trial) -> None:
        if trial not in self._trial_runs:
            client = MlflowClient(tracking_uri=self.tracking_uri)
            found = client.search_runs(
                [self.mlflow_util.experiment_id],
                filter_string=(
                    f"tags.trial_id = '{trial.trial_id}' and "
                    f"tags.`mlflow.parentRunId` = '{self.tags['mlflow.parentRunId']}'"
                ),
                max_results=1,
            )
            if found:
                run_id = found[0].info.run_id
                client.update_run(run_id, status="RUNNING")
                self._trial_runs[trial] = run_id
            else:
                tags = {**self.tags, **_trial_tags(trial.config), "trial_id": trial.trial_id, "trial_name": str(trial)}
                run = self.mlflow_util.start_run(tags=tags, run_name=str(trial))
                self._trial_runs[trial] = run.info.run_id
        log_params(MlflowClient(tracking_uri=self.tracking_uri), self._trial_runs[trial], _loggable(trial.config))


def param_text(value: Any) -> str:
    """A param's text, the same before and after a resume: Tune restores a config from JSON, where a tuple (a
    recipe's ``betas``) comes back a list, and MLflow refuses a param logged again with another text."""
    return str(list(value)) if isinstance(value, tuple) else str(value)


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Params in batches (MLflow takes at most 100 a request); nested dicts flattened with "/" as Ray does."""
    from mlflow.entities import Param
    from ray.tune.utils import flatten_dict

    items = [Param(str(k), param_text(v)) for k, v in flatten_dict(params, delimiter="/").items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100], synchronous=True)


def _trial_tags(config: dict[str, Any]) -> dict[str, str]:
    """cell / method / task of a study trial (the driver's inputs in its config)."""
    tags = {"cell": (config.get("__extras") or {}).get("cell"), "method": config.get("__method"),
            "task": config.get("task")}
    return {k: str(v) for k, v in tags.items() if v is not None}


def _loggable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("__")}
