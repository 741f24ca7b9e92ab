"""Checks of how a sweep runs: the training, tune, servers, mlflow and champion sections."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from saesweep.experiment.errors import MISSING, ErrorCollector
from saesweep.experiment.runtime import Resources

if TYPE_CHECKING:
    from saesweep.experiment.config import ExperimentConfig

logger = logging.getLogger(__name__)


def check_run_sections(exp: ExperimentConfig, errors: ErrorCollector) -> None:
    """Record the problems of the training, tune, servers, mlflow and champion sections."""
    _check_training(exp, errors)
    _check_tune(exp, errors)
    _check_servers(exp, errors)
    _check_tracking(exp, errors)
    _check_champion(exp, errors)


def _at_least(
    errors: ErrorCollector, path: str, value: float | None, minimum: float, fix: str
) -> bool:
    """Record an error unless `value` >= `minimum`, and return whether it passed."""
    if value is None or value >= minimum:
        return True
    errors.add(path, value, f"must be at least {minimum}", fix)
    return False


def _check_training(exp: ExperimentConfig, errors: ErrorCollector) -> None:
    training = exp.training
    batch_ok = _at_least(
        errors, "training.batch_size_tokens", training.batch_size_tokens, 1,
        "use a positive number of activation vectors per step, e.g. 4096.",
    )
    tokens_ok = _at_least(
        errors, "training.tokens_per_trial", training.tokens_per_trial, 1,
        "use a positive token budget, e.g. 2000000.",
    )
    if batch_ok and tokens_ok and training.tokens_per_trial < training.batch_size_tokens:
        errors.add(
            "training.tokens_per_trial", training.tokens_per_trial,
            "is smaller than one batch "
            f"(training.batch_size_tokens = {training.batch_size_tokens})",
            "raise tokens_per_trial or lower batch_size_tokens.",
            related=("training.batch_size_tokens",),
        )
    if training.lr <= 0:
        errors.add("training.lr", training.lr, "must be positive", "use e.g. 3e-4.")

    steps = training.total_steps
    for name in ("lr_warmup_steps", "sparsity_warmup_steps", "lr_decay_steps"):
        value = getattr(training, name)
        if value is not None and value < 0:
            errors.add(f"training.{name}", value, "must not be negative", "use 0 or more steps.")
    if training.lr_schedule == "constant" and training.lr_decay_steps is not None:
        errors.add(
            "training.lr_decay_steps", training.lr_decay_steps,
            "has no effect with lr_schedule: constant",
            "set training.lr_schedule to linear or cosine, or remove lr_decay_steps.",
            related=("training.lr_schedule",),
        )
    schedule_steps = training.lr_warmup_steps + (training.lr_decay_steps or 0)
    if steps and schedule_steps > steps:
        errors.add(
            "training.lr_warmup_steps", training.lr_warmup_steps,
            f"warm-up plus decay ({schedule_steps} steps) exceeds the {steps} steps of a trial "
            "(tokens_per_trial / batch_size_tokens)",
            "shorten the warm-up or decay, or raise tokens_per_trial.",
            related=("training.lr_decay_steps", "training.tokens_per_trial"),
        )
    if steps and training.sparsity_warmup_steps > steps:
        errors.add(
            "training.sparsity_warmup_steps", training.sparsity_warmup_steps,
            f"exceeds the {steps} steps of a trial, so the coefficient never reaches its value",
            f"use at most {steps} steps.",
            related=("training.tokens_per_trial",),
        )
    if training.grad_clip_norm is not None and training.grad_clip_norm <= 0:
        errors.add(
            "training.grad_clip_norm", training.grad_clip_norm, "must be positive",
            "use e.g. 1.0, or null to disable clipping.",
        )
    for index, beta in enumerate(training.adam_betas):
        if not 0 <= beta < 1:
            errors.add(
                f"training.adam_betas[{index}]", beta, "must be in [0, 1)",
                "use e.g. [0.9, 0.999].",
            )
    _at_least(
        errors, "training.dead_latent_window_tokens", training.dead_latent_window_tokens, 1,
        "use a window such as 1000000 tokens.",
    )
    if tokens_ok and training.dead_latent_window_tokens > training.tokens_per_trial:
        logger.warning(
            "training.dead_latent_window_tokens (%d) exceeds training.tokens_per_trial (%d): "
            "no latent will be counted dead",
            training.dead_latent_window_tokens, training.tokens_per_trial,
        )
    _at_least(errors, "training.log_every_steps", training.log_every_steps, 1, "use e.g. 50.")
    _at_least(
        errors, "training.checkpoint_every_steps", training.checkpoint_every_steps, 0,
        "use 0 to checkpoint only at the end, or a number of steps.",
    )
    _at_least(
        errors, "training.eval_tokens", training.eval_tokens, 0,
        "use 0 to skip the evaluation, or a number of tokens such as 100000.",
    )
    _at_least(
        errors, "training.ce_eval_tokens", training.ce_eval_tokens, 0,
        "use 0 to skip the spliced evaluation, or a number of tokens such as 4096.",
    )


def _check_tune(exp: ExperimentConfig, errors: ErrorCollector) -> None:
    tune = exp.tune
    _check_resources(tune.resources_per_trial, "tune.resources_per_trial", errors)
    _at_least(
        errors, "tune.max_concurrent_trials", tune.max_concurrent_trials, 1,
        "use 1 or more, or null to let the resources decide.",
    )
    if not tune.metric:
        errors.add("tune.metric", tune.metric, "is empty", "use e.g. explained_variance.")
    _at_least(errors, "tune.max_failures", tune.max_failures, 0, "use 0 or more.")
    if _at_least(errors, "tune.saes_per_trial", tune.saes_per_trial, 1, "use 1, or e.g. 4 to train 4 SAEs per trial."):
        if tune.saes_per_trial > 1 and tune.search_alg == "optuna":
            errors.add(
                "tune.saes_per_trial", tune.saes_per_trial,
                "needs every SAE config before the sweep starts, but optuna chooses each config from the results so far",
                "use search_alg grid or random, or saes_per_trial 1.",
                related=("tune.search_alg",),
            )
        if tune.saes_per_trial > 1 and tune.scheduler == "asha":
            errors.add(
                "tune.saes_per_trial", tune.saes_per_trial,
                "trains several SAEs in one trial, but asha stops one trial at a time",
                "use scheduler fifo, or saes_per_trial 1.",
                related=("tune.scheduler",),
            )
    if tune.scheduler != "asha":
        return
    asha = tune.asha
    if _at_least(
        errors, "tune.asha.grace_period_tokens", asha.grace_period_tokens, 1, "use e.g. 1000000.",
    ):
        if asha.grace_period_tokens >= exp.training.tokens_per_trial:
            errors.add(
                "tune.asha.grace_period_tokens", asha.grace_period_tokens,
                f"is not below training.tokens_per_trial ({exp.training.tokens_per_trial}), "
                "so ASHA can never stop a trial",
                "use a fraction of tokens_per_trial, e.g. a tenth.",
                related=("training.tokens_per_trial",),
            )
    if asha.reduction_factor <= 1:
        errors.add(
            "tune.asha.reduction_factor", asha.reduction_factor, "must be above 1", "use e.g. 4.",
        )
    _at_least(errors, "tune.asha.brackets", asha.brackets, 1, "use 1.")


def _check_resources(resources: Resources, path: str, errors: ErrorCollector) -> None:
    _at_least(errors, f"{path}.cpu", resources.cpu, 0, "use 0 or more CPUs, fractions allowed.")
    if _at_least(errors, f"{path}.gpu", resources.gpu, 0, "use 0 or more GPUs."):
        # Ray accepts a fraction of one GPU, or whole GPUs.
        if resources.gpu > 1 and not float(resources.gpu).is_integer():
            errors.add(
                f"{path}.gpu", resources.gpu, "above 1 GPU Ray needs a whole number",
                f"use {math.floor(resources.gpu)} or {math.ceil(resources.gpu)}, "
                "or a fraction below 1.",
            )
    for name, amount in resources.custom.items():
        if name in ("CPU", "GPU", "memory", "object_store_memory"):
            errors.add(
                f"{path}.custom.{name}", amount, "is a built-in Ray resource",
                f"use {path}.cpu and {path}.gpu for CPUs and GPUs.",
            )
        else:
            _at_least(errors, f"{path}.custom.{name}", amount, 0, "use 0 or more.")


def _check_servers(exp: ExperimentConfig, errors: ErrorCollector) -> None:
    servers = exp.servers
    _check_resources(servers.resources, "servers.resources", errors)
    _at_least(errors, "servers.count", servers.count, 1, "use 1 or more servers.")
    _at_least(errors, "servers.sequences_per_batch", servers.sequences_per_batch, 1, "use e.g. 8.")
    _at_least(
        errors, "servers.max_batches_in_flight", servers.max_batches_in_flight, 1, "use e.g. 4.",
    )
    _at_least(
        errors, "servers.normalization_tokens", servers.normalization_tokens, 1, "use e.g. 65536.",
    )
    _at_least(errors, "servers.max_restarts", servers.max_restarts, 0, "use 0 or more.")
    if servers.max_batch_memory_gb is not None and not servers.max_batch_memory_gb > 0:
        errors.add(
            "servers.max_batch_memory_gb", servers.max_batch_memory_gb, "is not positive",
            "use a size in GiB such as 8, or null to keep servers.count.",
        )
    batch = exp.training.batch_size_tokens
    if batch > 0 and servers.shuffle_buffer_tokens < batch:
        errors.add(
            "servers.shuffle_buffer_tokens", servers.shuffle_buffer_tokens,
            f"is smaller than one training batch (training.batch_size_tokens = {batch})",
            f"use at least {batch}, e.g. {4 * batch}.",
            related=("training.batch_size_tokens",),
        )
    if exp.hookpoints is not None and not errors.has_errors_under("hookpoints"):
        count = len(exp.hookpoint_names)
        if servers.count > count:
            logger.warning(
                "servers.count (%d) exceeds the %d hookpoints: some servers will have no work",
                servers.count, count,
            )


def _check_tracking(exp: ExperimentConfig, errors: ErrorCollector) -> None:
    if exp.mlflow.experiment_name == "":
        errors.add(
            "mlflow.experiment_name", "", "is empty", "remove it to use the experiment's name.",
        )
    if exp.mlflow.tracking_uri == "":
        errors.add("mlflow.tracking_uri", "", "is empty", "remove it to use the default store.")
    if not exp.output_dir:
        errors.add(
            "output_dir", exp.output_dir, "is empty", "use a folder such as saesweep_results.",
        )


def _check_champion(exp: ExperimentConfig, errors: ErrorCollector) -> None:
    champion = exp.champion
    if champion.policy in ("max_explained_variance_at_l0", "max_ce_loss_score_at_l0"):
        if champion.l0_max is None:
            errors.add(
                "champion.l0_max", MISSING, f"policy {champion.policy} needs it",
                "set the largest L0 a champion may have, e.g. l0_max: 100.",
                related=("champion.policy",),
            )
        elif champion.l0_max <= 0:
            errors.add("champion.l0_max", champion.l0_max, "must be positive", "use e.g. 100.")
    elif not champion.weights:
        errors.add(
            "champion.weights", {}, "is required by policy weighted_score",
            "set weights, e.g. {explained_variance: 1.0, l0: -0.001}.",
            related=("champion.policy",),
        )
    for name in ("explained_variance_metric", "ce_loss_score_metric", "l0_metric"):
        if not getattr(champion, name):
            errors.add(f"champion.{name}", "", "is empty", "name a reported metric.")

    # Only the spliced evaluation reports ce_loss_* and kl_div_* metrics; without it no trial
    # would be eligible and the sweep would end without a champion.
    spliced = champion.spliced_metrics_read()
    ce_eval_tokens = exp.training.ce_eval_tokens
    if spliced and ce_eval_tokens == 0:
        names = ", ".join(spliced)
        if champion.policy == "weighted_score":
            path, value, other_fix = "champion.weights", champion.weights, f"drop {names} from champion.weights"
        elif champion.policy == "max_ce_loss_score_at_l0" and champion.ce_loss_score_metric in spliced:
            path, value, other_fix = (
                "champion.policy", champion.policy, "use champion.policy: max_explained_variance_at_l0"
            )
        else:
            field_name = next(
                name for name in ("explained_variance_metric", "l0_metric") if getattr(champion, name) in spliced
            )
            path, value = f"champion.{field_name}", getattr(champion, field_name)
            other_fix = f"remove champion.{field_name} to use its default"
        errors.add(
            path, value,
            f"needs {names}, which trials report only when the SAE is spliced into the model, "
            f"but training.ce_eval_tokens = {ce_eval_tokens} turns that evaluation off",
            f"set training.ce_eval_tokens to a number of held-out tokens such as 4096, or {other_fix}.",
            related=("training.ce_eval_tokens",),
        )
    elif spliced and exp.training.ce_eval_trials == "champions":
        errors.add(
            "training.ce_eval_trials", exp.training.ce_eval_trials,
            f"scores only champions, but champion.policy reads {', '.join(spliced)} to choose them",
            "use training.ce_eval_trials: all, or a champion policy without ce_loss_* and kl_div_* metrics.",
            related=("champion.policy",),
        )
