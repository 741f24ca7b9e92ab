"""Choosing the best SAE per hookpoint and registering it in the MLflow model registry."""

from __future__ import annotations

import logging
import math
from typing import Any

from mlflow.exceptions import MlflowException

from saesweep.experiment import ChampionSection
from saesweep.tracking.settings import with_retry

logger = logging.getLogger(__name__)

CHAMPION_ALIAS = "champion"
METRIC_TAG_PREFIX = "metric."
HELDOUT_PREFIX = "heldout_"
"""Prefix of the metrics that trials measure on held-out text."""


def metric_value(metrics: dict[str, Any], name: str) -> float | None:
    """Return the value of metric `name`, measured on held-out text when the trial has it."""
    for key in (HELDOUT_PREFIX + name, name):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


L0_LIMITED_POLICIES = ("max_explained_variance_at_l0", "max_ce_loss_score_at_l0")
"""Policies that maximize one metric among the trials whose L0 is at most `l0_max`."""


def _maximized_metric(policy: ChampionSection) -> str:
    if policy.policy == "max_ce_loss_score_at_l0":
        return policy.ce_loss_score_metric
    return policy.explained_variance_metric


def policy_score(metrics: dict[str, Any], policy: ChampionSection) -> float | None:
    """Score of a trial under `policy` (higher is better), or None when it is not eligible."""
    if policy.policy in L0_LIMITED_POLICIES:
        score = metric_value(metrics, _maximized_metric(policy))
        l0 = metric_value(metrics, policy.l0_metric)
        if score is None or l0 is None:
            return None
        if policy.l0_max is not None and l0 > policy.l0_max:
            return None
        return score
    total = 0.0
    for name, weight in policy.weights.items():
        value = metric_value(metrics, name)
        if value is None:
            return None
        total += weight * value
    return total


def describe_policy(policy: ChampionSection) -> str:
    """Return one line that states the policy, for the report and the registry."""
    if policy.policy in L0_LIMITED_POLICIES:
        limit = f" with {policy.l0_metric} <= {policy.l0_max:g}" if policy.l0_max is not None else ""
        return f"highest {_maximized_metric(policy)}{limit}, measured on held-out text"
    terms = " + ".join(f"{weight:g} * {name}" for name, weight in policy.weights.items())
    return f"highest weighted score {terms}, measured on held-out text"


def choose_champions(outcomes: list, policy: ChampionSection) -> dict[str, Any]:
    """hookpoint -> the finished trial with the best score under `policy`."""
    best: dict[str, tuple[float, Any]] = {}
    for outcome in outcomes:
        if not outcome.ok:
            continue
        score = policy_score(outcome.metrics, policy)
        if score is None:
            continue
        hookpoint = outcome.config["hookpoint"]
        if hookpoint not in best or score > best[hookpoint][0]:
            best[hookpoint] = (score, outcome)
    return {hookpoint: outcome for hookpoint, (_, outcome) in best.items()}


def registered_model_name(model_name: str, hookpoint: str) -> str:
    """Return the name of the registered model that contains the champions of one model's hookpoint."""
    return f"saesweep.{model_name}.{hookpoint}"


def _version_tags(outcome: Any, policy_text: str, experiment: str) -> dict[str, str]:
    tags = {
        "saesweep.experiment": experiment,
        "saesweep.policy": policy_text,
        "saesweep.tune_trial_id": outcome.trial_id,
    }
    for key in ("architecture", "expansion_factor", "l1_coefficient", "l0_coefficient", "k"):
        if key in outcome.config:
            tags[key] = str(outcome.config[key])
    for key, value in outcome.metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            tags[METRIC_TAG_PREFIX + key] = repr(float(value))
    return tags


def _metrics_from_tags(tags: dict[str, str]) -> dict[str, float]:
    metrics = {}
    for key, value in tags.items():
        if key.startswith(METRIC_TAG_PREFIX):
            try:
                metrics[key[len(METRIC_TAG_PREFIX) :]] = float(value)
            except ValueError:
                continue
    return metrics


def register_champions(
    client: Any,
    *,
    experiment: str,
    model_name: str,
    champions: dict[str, Any],
    child_runs: dict[str, str],
    policy: ChampionSection,
) -> dict[str, dict[str, Any]]:
    """Register each champion as a model version; move the `champion` alias only
    when the new SAE beats the current champion under the same policy.

    Returns hookpoint -> {name, version, promoted}.
    """
    policy_text = describe_policy(policy)
    registered: dict[str, dict[str, Any]] = {}
    for hookpoint, outcome in sorted(champions.items()):
        run_id = child_runs.get(outcome.trial_id)
        if run_id is None:
            logger.warning("champion %s of %s has no MLflow run: not registered", outcome.trial_id, hookpoint)
            continue
        name = registered_model_name(model_name, hookpoint)
        _ensure_registered_model(client, name, experiment, model_name, hookpoint)

        current = _current_champion(client, name)
        new_score = policy_score(outcome.metrics, policy)
        if current is not None:
            current_score = policy_score(_metrics_from_tags(current.tags), policy)
            if current_score is not None and new_score is not None and current_score >= new_score:
                logger.info(
                    "%s: version %s stays champion (%.4f >= %.4f)", name, current.version, current_score, new_score
                )
                registered[hookpoint] = {"name": name, "version": current.version, "promoted": False}
                continue

        run = with_retry(lambda: client.get_run(run_id), "get run")
        version = with_retry(
            lambda: client.create_model_version(
                name,
                source=f"{run.info.artifact_uri}/sae",
                run_id=run_id,
                tags=_version_tags(outcome, policy_text, experiment),
                description=f"Champion of {hookpoint}: {policy_text}.",
            ),
            "create model version",
        )
        with_retry(lambda: client.set_registered_model_alias(name, CHAMPION_ALIAS, version.version), "set alias")
        logger.info("%s: version %s is the new champion (score %.4f)", name, version.version, new_score)
        registered[hookpoint] = {"name": name, "version": version.version, "promoted": True}
    return registered


def _ensure_registered_model(client: Any, name: str, experiment: str, model_name: str, hookpoint: str) -> None:
    try:
        with_retry(lambda: client.get_registered_model(name), "get registered model")
        # The tag names the experiment that registered a version most recently.
        with_retry(lambda: client.set_registered_model_tag(name, "saesweep.experiment", experiment), "tag model")
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        with_retry(
            lambda: client.create_registered_model(
                name,
                tags={
                    "saesweep.experiment": experiment,
                    "saesweep.model_name": model_name,
                    "saesweep.hook_name": hookpoint,
                },
                description=f"SAEs for {hookpoint} of {model_name}, trained by saesweep.",
            ),
            "create registered model",
        )


def _current_champion(client: Any, name: str) -> Any | None:
    try:
        return with_retry(lambda: client.get_model_version_by_alias(name, CHAMPION_ALIAS), "get champion")
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
