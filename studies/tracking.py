"""MLflow tracking of a study: one parent run per study run, every trial nested.

All MLflow calls of the driver live here. Trials are logged by Ray's
``MLflowLoggerCallback`` on the driver (one writer, so an embedded sqlite store
is safe). Two things Ray's callback does not do, done here:

* nesting: every trial run carries ``mlflow.parentRunId`` = the study run;
* no duplicates on resume: the callback forgets its runs when a study is
  restored, so ``NestedMLflowCallback`` first looks the trial up by its
  ``trial_id`` tag under the parent and continues that run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from ray.air.integrations.mlflow import MLflowLoggerCallback

PARENT_FILE = "mlflow_parent.json"


def default_tracking_uri(study_dir: Path) -> str:
    return f"sqlite:///{Path(study_dir).resolve() / 'mlflow.db'}"


def ui_command(uri: str) -> str:
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
    return f"open {uri} in a browser"


class StudyTracker:
    """The study's MLflow experiment and parent run (reused when a study resumes)."""

    def __init__(self, uri: str, experiment: str, study_dir: Path, tags: dict[str, str]):
        self.uri = uri
        self.experiment_name = experiment
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        # an embedded sqlite store keeps its artifacts next to it (else MLflow uses ./mlruns of the cwd);
        # a server decides itself (--artifacts-destination, proxied through the server)
        where = (Path(study_dir).resolve() / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment, where)
        self.parent_id = self._parent_run(Path(study_dir), tags)

    def _parent_run(self, study_dir: Path, tags: dict[str, str]) -> str:
        marker = study_dir / PARENT_FILE
        if marker.exists():
            known = json.loads(marker.read_text())
            run_id = known.get(self.uri)
            if run_id:
                try:
                    self.client.get_run(run_id)
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
        return NestedMLflowCallback(
            tracking_uri=self.uri,
            experiment_name=self.experiment_name,
            tags={"mlflow.parentRunId": self.parent_id, "stage": stage, **tags},
        )

    def log_artifacts(self, paths: list[Path], artifact_path: str = "report") -> None:
        for p in paths:
            self.client.log_artifact(self.parent_id, str(p), artifact_path=artifact_path)

    def log_params(self, params: dict[str, Any]) -> None:
        for k, v in params.items():
            try:
                self.client.log_param(self.parent_id, k, v)
            except Exception:  # noqa: BLE001 - same key logged by an earlier (resumed) run with another value
                self.client.set_tag(self.parent_id, f"param.{k}", str(v))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.parent_id, status=status)

    def settle_runs(self, stage: str, statuses: dict[str, str]) -> None:
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
    """Ray's MLflow callback with nested runs and at most one run per trial."""

    def log_trial_start(self, trial) -> None:
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
        self.mlflow_util.log_params(run_id=self._trial_runs[trial], params_to_log=_loggable(trial.config))


def _trial_tags(config: dict[str, Any]) -> dict[str, str]:
    """cell / method / task of a study trial (the driver's inputs in its config)."""
    tags = {"cell": (config.get("__extras") or {}).get("cell"), "method": config.get("__method"),
            "task": config.get("task")}
    return {k: str(v) for k, v in tags.items() if v is not None}


def _loggable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("__")}
