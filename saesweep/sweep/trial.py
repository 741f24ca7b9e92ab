"""One Tune trial: train one SAE config on one hookpoint from an activation server."""

from __future__ import annotations

import logging
import math
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from saesweep.activations.client import ActivationClient
from saesweep.evaluation.heldout import fetch_heldout, sae_file_bytes
from saesweep.experiment import ExperimentConfig
from saesweep.saes import SAE
from saesweep.sweep.space import trial_sae_config
from saesweep.tracking.champions import HELDOUT_PREFIX
from saesweep.tracking.runs import TrialTracker
from saesweep.tracking.settings import TrackingSettings, redact
from saesweep.training.metrics import evaluate_sae
from saesweep.training.trainer import Report, SAETrainer, TrainerConfig

logger = logging.getLogger(__name__)

TRAINER_STATE_FILENAME = "trainer_state.pt"
SAE_FOLDER = "sae"


@dataclass(frozen=True)
class TrialTracking:
    """Tracking target of a trial: the MLflow settings and the sweep's parent run."""

    settings: TrackingSettings
    parent_run_id: str


@dataclass(frozen=True)
class ServerRoutes:
    """Ray actor names of the activation servers, per hookpoint."""

    namespace: str
    train: dict[str, str]
    """hookpoint -> name of the server that streams its training activations."""
    heldout: str | None
    """Name of the server that streams held-out text for evaluation, or None."""


def trainer_config(exp: ExperimentConfig) -> TrainerConfig:
    """Build the trainer settings shared by every trial of `exp`."""
    training = exp.training
    return TrainerConfig(
        total_tokens=training.tokens_per_trial,
        batch_size=training.batch_size_tokens,
        lr=training.lr,
        adam_beta1=training.adam_betas[0],
        adam_beta2=training.adam_betas[1],
        lr_warmup_steps=training.lr_warmup_steps,
        lr_schedule=training.lr_schedule,
        lr_decay_steps=training.lr_decay_steps or 0,
        sparsity_warmup_steps=training.sparsity_warmup_steps,
        grad_clip_norm=training.grad_clip_norm,
        dead_latent_window=training.dead_latent_window_tokens,
        log_every_steps=training.log_every_steps,
        checkpoint_every_steps=training.checkpoint_every_steps,
        autocast=training.autocast,
    )


def _torch_threads() -> int:
    """Return one torch thread per whole CPU that Ray assigned to this trial, at least one."""
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    except Exception:  # noqa: BLE001 - outside Ray: keep torch's default
        return torch.get_num_threads()
    return max(1, math.floor(cpus))


def _install_sigterm_checkpoint(trainer: SAETrainer) -> None:
    """Ask the trainer to stop and checkpoint on SIGTERM.

    NOTE: Python accepts signal handlers only in the main thread; Tune runs
    function trainables in a worker thread, where this is skipped and the
    periodic checkpoints are what a resumed trial starts from.
    """
    if threading.current_thread() is not threading.main_thread():
        return

    def handle(signum: int, frame: Any) -> None:
        logger.warning("SIGTERM: stopping after this step and writing a checkpoint")
        trainer.request_stop()

    signal.signal(signal.SIGTERM, handle)


class TuneReporter:
    """Send trainer reports to Tune, with a checkpoint folder when one is due,
    and each logging step's metrics to the trial's MLflow run."""

    def __init__(self, tracker: TrialTracker | None):
        self.tracker = tracker
        self.last_metrics: dict[str, float] = {}

    def __call__(self, trainer: SAETrainer, report: Report) -> None:
        self.last_metrics.update(report.metrics)
        metrics = {**self.last_metrics, "step": report.step, "tokens_trained": float(report.tokens_trained)}
        if self.tracker is not None and report.metrics:
            self.tracker.log_metrics(report.step, report.metrics)
        if report.checkpoint:
            with tempfile.TemporaryDirectory() as folder:
                save_checkpoint(trainer, Path(folder))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
        elif not report.final:
            tune.report(metrics)


def save_checkpoint(trainer: SAETrainer, folder: Path, sparsity: bool = False) -> None:
    """Write the trainer state and the SAE (SAELens files, scale folded in) to `folder`."""
    torch.save(trainer.state_dict(), folder / TRAINER_STATE_FILENAME)
    log_density = trainer.firing.log10_density() if sparsity else None
    trainer.sae.save_model(folder / SAE_FOLDER, sparsity=log_density)


def _coefficient(config: dict[str, Any]) -> tuple[str, Any]:
    from saesweep.saes import get_architecture

    name = get_architecture(config["architecture"]).sparsity_coefficient
    return name, config[name]


def _open_tracker(
    tracking: TrialTracking | None, trial_id: str, config: dict[str, Any], params: dict[str, Any]
) -> TrialTracker | None:
    if tracking is None:
        return None
    coefficient_name, coefficient = _coefficient(config)
    run_name = f"{config['hookpoint']}/{config['architecture']}/x{config['expansion_factor']}/{coefficient_name}={coefficient}"
    tags = {
        "hookpoint": config["hookpoint"],
        "architecture": config["architecture"],
        "expansion_factor": config["expansion_factor"],
        "coefficient_name": coefficient_name,
        "coefficient": coefficient,
        "ray_node_id": ray.get_runtime_context().get_node_id(),
    }
    return TrialTracker(tracking.settings, tracking.parent_run_id, trial_id, run_name=run_name, tags=tags, params=params)


def run_trial(
    config: dict[str, Any],
    *,
    exp: ExperimentConfig,
    routes: ServerRoutes,
    tracking: TrialTracking | None = None,
    prepend_bos: bool | None = None,
) -> None:
    """Tune function trainable: train, evaluate on held-out text, report, save."""
    hookpoint = config["hookpoint"]
    trial_id = tune.get_context().get_trial_id()
    torch.set_num_threads(_torch_threads())
    logger.info("trial %s starts: hookpoint %s, config %s", trial_id, hookpoint, config)

    server = ray.get_actor(routes.train[hookpoint], namespace=routes.namespace)
    # The sweep starts trials while servers still load their model and estimate the
    # normalization scale, so the trial's own start-up overlaps the server's.
    ray.get(server.ready.remote())
    trainer_cfg = trainer_config(exp)
    client = ActivationClient(
        server,
        hookpoint,
        batch_size=trainer_cfg.batch_size,
        shuffle_buffer_tokens=exp.servers.shuffle_buffer_tokens,
        seed=exp.training.seed,
    )
    tracker = None
    try:
        sae_cfg = trial_sae_config(
            exp,
            config,
            d_in=client.d_in,
            prepend_bos=prepend_bos,
            model_from_pretrained_kwargs=redact(dict(exp.model.load_options)),
            metadata={"tune_trial_id": trial_id, "served_positions": "no padding, BOS, separator or position 0"},
        )
        tracker = _open_tracker(tracking, trial_id, config, {"sae": sae_cfg.to_dict(), "trainer": trainer_cfg.to_dict()})
        sae = SAE.from_config(sae_cfg)
        sae.activation_norm_scale = client.norm_scale
        reporter = TuneReporter(tracker)
        trainer = SAETrainer(sae, trainer_cfg, report_fn=reporter)
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                trainer.load_state_dict(torch.load(Path(folder) / TRAINER_STATE_FILENAME, weights_only=False))
            logger.info("trial %s resumes at step %d", trial_id, trainer.step)
        _install_sigterm_checkpoint(trainer)

        trainer.fit(client)
        client.close()
        if trainer.stop_requested:
            return
        heldout = _evaluate(sae, exp, routes, hookpoint)
    except Exception as error:
        logger.exception("trial %s on %s failed", trial_id, hookpoint)
        if tracker is not None:
            tracker.finish(error=f"{type(error).__name__}: {error}")
        raise
    finally:
        client.close()

    heldout_metrics = {HELDOUT_PREFIX + name: value for name, value in heldout.items()}
    metrics = {
        **reporter.last_metrics,
        **heldout_metrics,
        "step": trainer.step,
        "tokens_trained": float(trainer.tokens_trained),
        "node_id": ray.get_runtime_context().get_node_id(),
        "done": True,
    }
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(trainer, Path(folder), sparsity=True)
        if tracker is not None:
            tracker.log_final(trainer.step, heldout_metrics)
            tracker.log_sae(Path(folder) / SAE_FOLDER)
            tracker.finish()
        logger.info(
            "trial %s done: %s explained variance %.4f, L0 %.1f on held-out text",
            trial_id,
            hookpoint,
            heldout.get("explained_variance", float("nan")),
            heldout.get("l0", float("nan")),
        )
        # The last statement: Tune ends the trial on a result with done=True.
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def _evaluate(sae: SAE, exp: ExperimentConfig, routes: ServerRoutes, hookpoint: str) -> dict[str, float]:
    """Reconstruction metrics of `sae` on the sweep's fixed held-out activations of `hookpoint`."""
    if routes.heldout is None:
        return {}
    server = ray.get_actor(routes.heldout, namespace=routes.namespace)
    sae.eval()
    result: dict[str, float] = {}
    if exp.training.eval_tokens > 0:
        activations = fetch_heldout(server, hookpoint)
        metrics = evaluate_sae(sae, activations.split(4096))
        result.update(metrics.as_dict(), eval_tokens=float(metrics.n_tokens))
    if exp.training.ce_eval_tokens > 0 and exp.training.ce_eval_trials == "all":
        result.update(ray.get(server.spliced_scores.remote(sae_file_bytes(sae))))
    return result
