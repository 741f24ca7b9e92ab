"""One Tune trial: train one SAE config, or several of one hookpoint together, from an activation server."""

from __future__ import annotations

import json
import logging
import math
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from saesweep.activations.client import ActivationClient
from saesweep.evaluation.heldout import fetch_heldout, sae_file_bytes
from saesweep.experiment import ExperimentConfig
from saesweep.saes import SAE
from saesweep.sweep.space import PACK_KEY, trial_members, trial_sae_config
from saesweep.tracking.champions import HELDOUT_PREFIX
from saesweep.tracking.runs import TrialTracker
from saesweep.tracking.settings import TrackingSettings, redact
from saesweep.training.group import fit_together
from saesweep.training.metrics import evaluate_sae
from saesweep.training.trainer import Report, SAETrainer, TrainerConfig

logger = logging.getLogger(__name__)

TRAINER_STATE_FILENAME = "trainer_state.pt"
SAE_FOLDER = "sae"
MEMBERS_FOLDER = "members"
MEMBERS_FILENAME = "members.json"


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
        sparse_decoder=training.sparse_decoder,
    )


def _torch_threads() -> int:
    """Return one torch thread per whole CPU that Ray assigned to this trial, at least one."""
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    except Exception:  # noqa: BLE001 - outside Ray: keep torch's default
        return torch.get_num_threads()
    return max(1, math.floor(cpus))


def _install_sigterm_checkpoint(trainers: list[SAETrainer]) -> None:
    """Ask the trainers to stop and checkpoint on SIGTERM.

    NOTE: Python accepts signal handlers only in the main thread; Tune runs
    function trainables in a worker thread, where this is skipped and the
    periodic checkpoints are what a resumed trial starts from.
    """
    if threading.current_thread() is not threading.main_thread():
        return

    def handle(signum: int, frame: Any) -> None:
        logger.warning("SIGTERM: stopping after this step and writing a checkpoint")
        for trainer in trainers:
            trainer.request_stop()

    signal.signal(signal.SIGTERM, handle)


@dataclass
class Member:
    """One SAE that a trial trains: its config, trainer, MLflow run and outcome."""

    member_id: str
    """The trial id, or `<trial id>-<index>` in a trial that trains several SAEs."""
    config: dict[str, Any]
    trainer: SAETrainer
    tracker: TrialTracker | None
    metrics: dict[str, Any] = field(default_factory=dict)
    """Latest training metrics, then the final ones with the held-out metrics."""
    error: str | None = None
    finished: bool = False
    """True once its MLflow run is closed."""

    def close_run(self, error: str | None = None) -> None:
        if self.tracker is not None and not self.finished:
            self.tracker.finish(error=error)
        self.finished = True


class TrialState:
    """The SAEs of one trial and the layout of its checkpoint folders.

    A trial with one SAE writes `trainer_state.pt` and `sae/` at the top of its
    checkpoint. A trial that trains several writes `members.json` (ids, errors and
    final metrics) and `members/<index>/trainer_state.pt` and `members/<index>/sae/`.
    """

    def __init__(self, members: list[Member], packed: bool, metric: str, mode: str):
        self.members = members
        self.packed = packed
        self.metric = metric
        self.mode = mode
        self.failed: dict[int, BaseException] = {}

    def folder_of(self, root: Path, index: int) -> Path:
        return root / MEMBERS_FOLDER / str(index) if self.packed else root

    def save(self, root: Path, final: bool = False) -> None:
        """Write the trainer state and the SAE files of every SAE still training;
        `final` adds each SAE's latent densities."""
        for index, member in enumerate(self.members):
            if index in self.failed:
                continue
            folder = self.folder_of(root, index)
            folder.mkdir(parents=True, exist_ok=True)
            save_checkpoint(member.trainer, folder, sparsity=final)
        if self.packed:
            record = {
                "ids": [member.member_id for member in self.members],
                "errors": {str(index): self.members[index].error for index in self.failed},
                "metrics": {str(index): member.metrics for index, member in enumerate(self.members)},
            }
            (root / MEMBERS_FILENAME).write_text(json.dumps(record, default=str))

    def load(self, root: Path) -> None:
        """Continue from a checkpoint written by `save`."""
        if self.packed and (root / MEMBERS_FILENAME).is_file():
            record = json.loads((root / MEMBERS_FILENAME).read_text())
            for index, text in record.get("errors", {}).items():
                self.mark_failed(int(index), RuntimeError(text), text=text)
        for index, member in enumerate(self.members):
            if index not in self.failed:
                state = torch.load(self.folder_of(root, index) / TRAINER_STATE_FILENAME, weights_only=False)
                member.trainer.load_state_dict(state)

    def mark_failed(self, index: int, error: BaseException, text: str | None = None) -> None:
        """Record that SAE `index` failed and close its MLflow run with the reason."""
        member = self.members[index]
        self.failed[index] = error
        member.error = text or f"{type(error).__name__}: {error}"
        member.close_run(error=member.error)

    def close_failed_runs(self) -> None:
        """Close the MLflow runs of SAEs that the trainers dropped since the last call."""
        for index, error in self.failed.items():
            if self.members[index].error is None:
                self.mark_failed(index, error)

    def result(self) -> dict[str, Any]:
        """Return the Tune result: the SAE's metrics, or for several SAEs each one's
        under `members` and the best value of the sweep's metric at the top level."""
        lead = next(m.trainer for i, m in enumerate(self.members) if i not in self.failed)
        progress = {"step": lead.step, "tokens_trained": float(lead.tokens_trained)}
        if not self.packed:
            return {**self.members[0].metrics, **progress}
        result: dict[str, Any] = {
            **progress,
            "members": {m.member_id: {**m.metrics, **progress} for i, m in enumerate(self.members) if i not in self.failed},
            "tokens_per_second": sum(
                m.metrics.get("tokens_per_second", 0.0) for i, m in enumerate(self.members) if i not in self.failed
            ),
        }
        values = [m.metrics[self.metric] for m in self.members if self.metric in m.metrics and m.error is None]
        if values:
            result[self.metric] = max(values) if self.mode == "max" else min(values)
        return result


class TuneReporter:
    """Send each report of the trainers to Tune, with a checkpoint folder when one
    is due, and each SAE's metrics to its MLflow run."""

    def __init__(self, state: TrialState):
        self.state = state

    def __call__(self, reports: list[tuple[int, SAETrainer, Report]]) -> None:
        for index, _, report in reports:
            member = self.state.members[index]
            member.metrics.update(report.metrics)
            if member.tracker is not None and report.metrics:
                member.tracker.log_metrics(report.step, report.metrics)
        self.state.close_failed_runs()
        _, _, first = reports[0]
        if first.checkpoint:
            with tempfile.TemporaryDirectory() as folder:
                self.state.save(Path(folder))
                tune.report(self.state.result(), checkpoint=tune.Checkpoint.from_directory(folder))
        elif not first.final:
            tune.report(self.state.result())


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
    """Tune function trainable: train the trial's SAEs, evaluate them on held-out
    text, report, save. A diverging SAE fails alone; the trial fails when all do."""
    hookpoint = config["hookpoint"]
    trial_id = tune.get_context().get_trial_id()
    configs = trial_members(config)
    packed = PACK_KEY in config
    torch.set_num_threads(_torch_threads())
    logger.info("trial %s starts: hookpoint %s, %d SAE(s): %s", trial_id, hookpoint, len(configs), configs)

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
    members: list[Member] = []
    try:
        for index, member_config in enumerate(configs):
            member_id = f"{trial_id}-{index}" if packed else trial_id
            sae_cfg = trial_sae_config(
                exp,
                member_config,
                d_in=client.d_in,
                prepend_bos=prepend_bos,
                model_from_pretrained_kwargs=redact(dict(exp.model.load_options)),
                metadata={"tune_trial_id": member_id, "served_positions": "no padding, BOS, separator or position 0"},
            )
            tracker = _open_tracker(
                tracking, member_id, member_config, {"sae": sae_cfg.to_dict(), "trainer": trainer_cfg.to_dict()}
            )
            sae = SAE.from_config(sae_cfg)
            sae.activation_norm_scale = client.norm_scale
            members.append(Member(member_id, member_config, SAETrainer(sae, trainer_cfg), tracker))
        state = TrialState(members, packed, metric=exp.tune.metric, mode=exp.tune.mode)
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                state.load(Path(folder))
            logger.info("trial %s resumes at step %d", trial_id, members[0].trainer.step)
        trainers = [member.trainer for member in members]
        _install_sigterm_checkpoint(trainers)

        fit_together(trainers, client, report_fn=TuneReporter(state), failed=state.failed)
        state.close_failed_runs()
        client.close()
        if any(trainer.stop_requested for trainer in trainers):
            return
        for index, member in enumerate(members):
            if index in state.failed:
                continue
            heldout = _evaluate(member.trainer.sae, exp, routes, hookpoint)
            member.metrics.update({HELDOUT_PREFIX + name: value for name, value in heldout.items()})
            member.metrics.update(
                step=member.trainer.step,
                tokens_trained=float(member.trainer.tokens_trained),
                node_id=ray.get_runtime_context().get_node_id(),
            )
            logger.info(
                "SAE %s done: %s explained variance %.4f, L0 %.1f on held-out text",
                member.member_id,
                hookpoint,
                heldout.get("explained_variance", float("nan")),
                heldout.get("l0", float("nan")),
            )
    except Exception as error:
        logger.exception("trial %s on %s failed", trial_id, hookpoint)
        for member in members:
            member.close_run(error=f"{type(error).__name__}: {error}")
        raise
    finally:
        client.close()

    with tempfile.TemporaryDirectory() as folder:
        state.save(Path(folder), final=True)
        for index, member in enumerate(members):
            if index in state.failed or member.tracker is None:
                continue
            heldout_metrics = {name: value for name, value in member.metrics.items() if name.startswith(HELDOUT_PREFIX)}
            member.tracker.log_final(member.trainer.step, heldout_metrics)
            member.tracker.log_sae(state.folder_of(Path(folder), index) / SAE_FOLDER)
            member.close_run()
        # The last statement: Tune ends the trial on a result with done=True.
        tune.report({**state.result(), "done": True}, checkpoint=tune.Checkpoint.from_directory(folder))


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
