"""Tracking settings of a sweep: the MLflow URI, experiment and artifact location."""

from __future__ import annotations

import logging
import random
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from saesweep.experiment import ExperimentConfig

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Substrings of option names whose values are credentials; such values are
# replaced before anything is logged or saved.
SECRET_MARKERS = ("token", "secret", "password", "api_key", "apikey", "credential")
REDACTED = "<redacted>"
SQLITE_PREFIX = "sqlite:///"


@dataclass(frozen=True)
class TrackingSettings:
    """MLflow settings shared by the driver and every trial of a sweep."""

    tracking_uri: str
    experiment_name: str
    artifact_location: str | None


def tracking_settings(exp: ExperimentConfig) -> TrackingSettings | None:
    """Resolve the MLflow settings of `exp`, or None when tracking is disabled.

    The tracking URI is MLFLOW_TRACKING_URI when set, else mlflow.tracking_uri,
    else a SQLite store in output_dir.
    """
    if not exp.mlflow.enabled:
        return None
    tracking_uri = exp.mlflow.resolve_tracking_uri(exp.output_dir)
    artifact_location = exp.mlflow.resolve_artifact_location(exp.output_dir)
    if artifact_location is None and tracking_uri.startswith(SQLITE_PREFIX):
        # Without a server MLflow would put artifacts in ./mlruns of whichever
        # process logs them; keep them beside the database instead.
        database = Path(tracking_uri[len(SQLITE_PREFIX) :].split("?", 1)[0]).resolve()
        artifact_location = (database.parent / "mlartifacts").as_uri()
    return TrackingSettings(
        tracking_uri=tracking_uri,
        experiment_name=exp.mlflow_experiment_name,
        artifact_location=artifact_location,
    )


def redact(options: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of `options` with every credential value replaced, recursively."""
    result: dict[str, Any] = {}
    for key, value in options.items():
        if any(marker in str(key).lower() for marker in SECRET_MARKERS):
            result[key] = REDACTED
        elif isinstance(value, dict):
            result[key] = redact(value)
        else:
            result[key] = value
    return result


def _is_lock_error(error: Exception) -> bool:
    return "database is locked" in str(error) or "database table is locked" in str(error)


def with_retry(call: Callable[[], T], what: str, attempts: int = 8) -> T:
    """Run `call`, retrying with jittered backoff while SQLite reports a lock.

    Several trials writing to one SQLite store at once can collide; each retry
    is logged, and the last failure is raised.
    """
    for attempt in range(attempts):
        try:
            return call()
        except (MlflowException, sqlite3.OperationalError) as error:
            if not _is_lock_error(error) or attempt == attempts - 1:
                raise
            delay = min(5.0, 0.05 * 2**attempt) * (0.5 + random.random())
            logger.warning("%s: SQLite store is locked, retry %d in %.2f s", what, attempt + 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def make_client(settings: TrackingSettings) -> MlflowClient:
    return MlflowClient(tracking_uri=settings.tracking_uri)


def ensure_experiment(client: MlflowClient, settings: TrackingSettings) -> str:
    """Return the id of the MLflow experiment, creating it if needed."""
    existing = with_retry(lambda: client.get_experiment_by_name(settings.experiment_name), "get experiment")
    if existing is not None:
        if existing.lifecycle_stage == "deleted":
            raise ValueError(
                f"MLflow experiment {settings.experiment_name!r} is deleted: restore it in the MLflow UI "
                "or set mlflow.experiment_name to a new name"
            )
        return existing.experiment_id
    logger.info("creating MLflow experiment %s at %s", settings.experiment_name, settings.tracking_uri)
    return with_retry(
        lambda: client.create_experiment(settings.experiment_name, artifact_location=settings.artifact_location),
        "create experiment",
    )


def enable_sqlite_wal(tracking_uri: str) -> None:
    """Switch a SQLite tracking store to write-ahead logging.

    In WAL mode readers and the one writer do not block each other, so
    concurrent trials wait less on the database lock (SQLite, "Write-Ahead Logging").
    """
    if not tracking_uri.startswith(SQLITE_PREFIX):
        return
    path = tracking_uri[len(SQLITE_PREFIX) :].split("?", 1)[0]
    with sqlite3.connect(path, timeout=30) as connection:
        connection.execute("PRAGMA journal_mode=WAL")
