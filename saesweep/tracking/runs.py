"""The sweep's MLflow runs: one parent per sweep, one nested child per trial."""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Metric, Param
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from saesweep.tracking.settings import TrackingSettings, ensure_experiment, make_client, with_retry

logger = logging.getLogger(__name__)

PARENT_RUN_FILENAME = "mlflow_parent_run.json"
TRIAL_ID_TAG = "saesweep.tune_trial_id"
SWEEP_TAG = "saesweep.sweep"
# MLflow limits (mlflow.utils.validation): 6000 characters per param value,
# 100 params and 1000 metrics per log_batch call.
MAX_PARAM_VALUE = 6000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}; values longer than MLflow allows are cut."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
            flat[name] = text[:MAX_PARAM_VALUE]
    return flat


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    items = [Param(key, value) for key, value in params.items()]
    for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
        chunk = items[start : start + MAX_PARAMS_PER_BATCH]
        with_retry(lambda: client.log_batch(run_id, params=chunk), "log params")


def log_metrics(client, run_id: str, step: int, metrics: dict[str, Any]) -> None:
    """Log every finite numeric metric at `step` in one call per 1000 values."""
    timestamp = int(time.time() * 1000)
    batch = [
        Metric(key, float(value), timestamp, step)
        for key, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ]
    for start in range(0, len(batch), MAX_METRICS_PER_BATCH):
        chunk = batch[start : start + MAX_METRICS_PER_BATCH]
        with_retry(lambda: client.log_batch(run_id, metrics=chunk), "log metrics")


class SweepTracker:
    """The parent run of a sweep, opened by the driver.

    The parent run id is kept in the Tune folder, so `resume` continues the
    same parent run and its children.
    """

    def __init__(self, settings: TrackingSettings, tune_path: Path):
        self.settings = settings
        self.tune_path = tune_path
        self.client = make_client(settings)
        self.experiment_id: str | None = None
        self.run_id: str | None = None

    def start(self, sweep_name: str, resolved_experiment: dict[str, Any], resume: bool) -> str:
        self.experiment_id = ensure_experiment(self.client, self.settings)
        marker = self.tune_path / PARENT_RUN_FILENAME
        if resume and marker.is_file():
            self.run_id = json.loads(marker.read_text())["run_id"]
            with_retry(lambda: self.client.update_run(self.run_id, status="RUNNING"), "reopen parent run")
            logger.info("continuing MLflow parent run %s", self.run_id)
            return self.run_id

        run = with_retry(
            lambda: self.client.create_run(
                self.experiment_id, run_name=sweep_name, tags={SWEEP_TAG: sweep_name}
            ),
            "create parent run",
        )
        self.run_id = run.info.run_id
        _log_params(self.client, self.run_id, flatten(resolved_experiment))
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "experiment.yaml"
            path.write_text(yaml.safe_dump(resolved_experiment, sort_keys=False))
            with_retry(lambda: self.client.log_artifact(self.run_id, str(path)), "log experiment")
        self.tune_path.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"run_id": self.run_id, "experiment_id": self.experiment_id}))
        logger.info("MLflow parent run %s in experiment %s", self.run_id, self.settings.experiment_name)
        return self.run_id

    def log_metrics(self, metrics: dict[str, Any], step: int = 0) -> None:
        log_metrics(self.client, self.run_id, step, metrics)

    def log_artifacts(self, folder: Path, artifact_path: str) -> None:
        with_retry(lambda: self.client.log_artifacts(self.run_id, str(folder), artifact_path), "log artifacts")

    def child_runs(self) -> dict[str, str]:
        """Tune trial id -> child run id, for every child of the parent run."""
        runs = with_retry(
            lambda: self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.run_id}'", max_results=50000
            ),
            "search child runs",
        )
        return {run.data.tags[TRIAL_ID_TAG]: run.info.run_id for run in runs if TRIAL_ID_TAG in run.data.tags}

    def finish(self, failed: bool) -> None:
        status = "FAILED" if failed else "FINISHED"
        with_retry(lambda: self.client.set_terminated(self.run_id, status=status), "close parent run")


class TrialTracker:
    """The child run of one trial, opened inside the trial's worker.

    A resumed trial finds its child run again by its Tune trial id and skips
    steps that were logged before the interruption, so the metric history has
    no duplicate steps.
    """

    def __init__(
        self,
        settings: TrackingSettings,
        parent_run_id: str,
        trial_id: str,
        *,
        run_name: str,
        tags: dict[str, Any],
        params: dict[str, Any],
    ):
        self.client = make_client(settings)
        experiment_id = ensure_experiment(self.client, settings)
        self.last_step = -1
        existing = with_retry(
            lambda: self.client.search_runs(
                [experiment_id],
                filter_string=(
                    f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}' and tags.`{TRIAL_ID_TAG}` = '{trial_id}'"
                ),
            ),
            "search trial run",
        )
        if existing:
            self.run_id = existing[0].info.run_id
            history = with_retry(lambda: self.client.get_metric_history(self.run_id, "tokens_trained"), "read history")
            self.last_step = max((m.step for m in history), default=-1)
            with_retry(lambda: self.client.update_run(self.run_id, status="RUNNING"), "reopen trial run")
            logger.info("trial %s continues MLflow run %s after step %d", trial_id, self.run_id, self.last_step)
            return

        all_tags = {MLFLOW_PARENT_RUN_ID: parent_run_id, TRIAL_ID_TAG: trial_id, MLFLOW_RUN_NAME: run_name}
        all_tags.update({key: str(value) for key, value in tags.items()})
        run = with_retry(
            lambda: self.client.create_run(experiment_id, run_name=run_name, tags=all_tags), "create trial run"
        )
        self.run_id = run.info.run_id
        _log_params(self.client, self.run_id, flatten(params))

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        """Log one step's metrics in one call; steps already logged are skipped."""
        if step <= self.last_step:
            return
        log_metrics(self.client, self.run_id, step, metrics)
        self.last_step = step

    def log_final(self, step: int, metrics: dict[str, Any]) -> None:
        """Log end-of-trial metrics (held-out evaluation) at the last training step;
        their names differ from the training metrics, so no step repeats."""
        log_metrics(self.client, self.run_id, step, metrics)

    def log_sae(self, folder: Path) -> None:
        with_retry(lambda: self.client.log_artifacts(self.run_id, str(folder), "sae"), "log SAE")

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            with_retry(lambda: self.client.set_tag(self.run_id, key, str(value)), "set tag")

    def finish(self, error: str | None = None) -> None:
        if error is not None:
            self.set_tags({"saesweep.error": error[:5000]})
        status = "FAILED" if error is not None else "FINISHED"
        with_retry(lambda: self.client.set_terminated(self.run_id, status=status), "close trial run")
