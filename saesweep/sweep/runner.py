"""The sweep runner (Ray driver): servers up, Tune trials, results gathered."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray
from ray import tune

from saesweep import raycluster
from saesweep.activations.server import ServerConfig, start_server
from saesweep.experiment import ExperimentConfig
from saesweep.sweep.live import LiveView
from saesweep.sweep.space import build_param_space, build_tune_config, count_trials
from saesweep.sweep.trial import HELDOUT_PREFIX, SAE_FOLDER, ServerRoutes, run_trial

logger = logging.getLogger(__name__)

SUMMARY_FILENAME = "summary.json"


@dataclass
class TrialOutcome:
    """What one trial left behind."""

    trial_id: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    error: str | None
    sae_path: str | None

    @property
    def ok(self) -> bool:
        return self.error is None and self.sae_path is not None


@dataclass
class SweepResult:
    """The outcome of one `run_sweep` call."""

    experiment: str
    tune_path: str
    trials: list[TrialOutcome]
    lm_forward_tokens: int
    wall_time_s: float
    server_stats: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tokens_trained(self) -> int:
        return int(sum(t.metrics.get("tokens_trained", 0) for t in self.trials))

    @property
    def sharing_ratio(self) -> float:
        """Tokens trained over all trials per model forward token."""
        return self.tokens_trained / self.lm_forward_tokens if self.lm_forward_tokens else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "tune_path": self.tune_path,
            "lm_forward_tokens": self.lm_forward_tokens,
            "tokens_trained": self.tokens_trained,
            "sharing_ratio": self.sharing_ratio,
            "wall_time_s": self.wall_time_s,
            "trials": [t.__dict__ for t in self.trials],
        }


def split_hookpoints(hookpoints: list[str], count: int) -> list[list[str]]:
    """Divide hookpoints into `count` contiguous groups of nearly equal size."""
    count = max(1, min(count, len(hookpoints)))
    size = math.ceil(len(hookpoints) / count)
    return [hookpoints[i : i + size] for i in range(0, len(hookpoints), size)]


def _server_config(exp: ExperimentConfig, hookpoints: list[str], split: str) -> ServerConfig:
    return ServerConfig(
        hookpoints=tuple(hookpoints),
        model=exp.model.name,
        dtype=exp.model.dtype,
        device=exp.model.device,
        random_weights=exp.model.random_weights,
        load_options=dict(exp.model.load_options),
        dataset=exp.data.dataset,
        text_column=exp.data.text_column,
        split=split,
        context_size=exp.data.context_size,
        seed=exp.data.seed,
        # 1 keeps the packed order of the windows.
        shuffle_windows=ServerConfig.shuffle_windows if exp.data.shuffle else 1,
        sequences_per_batch=exp.servers.sequences_per_batch,
        max_batches_in_flight=exp.servers.max_batches_in_flight,
        norm_estimate_tokens=exp.servers.normalization_tokens,
    )


def _ray_cpus_needed(exp: ExperimentConfig, n_trials: int) -> float:
    concurrent = min(n_trials, exp.tune.max_concurrent_trials or n_trials)
    servers = min(exp.servers.count, len(exp.hookpoint_names))
    return servers * exp.servers.resources.cpu + 0.5 + concurrent * exp.tune.resources_per_trial.cpu


def start_servers(exp: ExperimentConfig, namespace: str) -> tuple[ServerRoutes, list[Any]]:
    """Start the activation servers of `exp` and the held-out evaluation server."""
    groups = split_hookpoints(exp.hookpoint_names, exp.servers.count)
    resources = exp.servers.resources
    handles = []
    train_routes: dict[str, str] = {}
    for index, group in enumerate(groups):
        name = f"activation-server-{index}"
        logger.info("starting activation server %s for %s", name, ", ".join(group))
        handles.append(
            start_server(
                _server_config(exp, group, "train"),
                name=name,
                num_cpus=resources.cpu,
                num_gpus=resources.gpu,
                resources=dict(resources.custom),
                max_restarts=exp.servers.max_restarts,
                wait=False,
            )
        )
        train_routes.update({hookpoint: name for hookpoint in group})

    heldout_name = None
    if exp.training.eval_tokens > 0:
        heldout_name = "heldout-server"
        handles.append(
            start_server(
                _server_config(exp, exp.hookpoint_names, "heldout"),
                name=heldout_name,
                num_cpus=min(0.5, resources.cpu),
                num_gpus=min(resources.gpu, 0.5) if resources.gpu else 0,
                resources={key: value / 2 for key, value in resources.custom.items()},
                max_restarts=exp.servers.max_restarts,
                wait=False,
            )
        )
    ray.get([handle.ready.remote() for handle in handles])
    return ServerRoutes(namespace=namespace, train=train_routes, heldout=heldout_name), handles


def _outcomes(results: tune.ResultGrid) -> list[TrialOutcome]:
    outcomes = []
    for result in results:
        metrics = dict(result.metrics or {})
        trial_id = str(metrics.get("trial_id") or Path(result.path).name)
        sae_path = None
        if result.checkpoint is not None and metrics.get("done"):
            candidate = Path(result.checkpoint.path) / SAE_FOLDER
            sae_path = str(candidate) if candidate.is_dir() else None
        error = None
        if result.error is not None:
            error = f"{type(result.error).__name__}: {result.error}".strip()
        elif not metrics.get("done"):
            error = "stopped before it finished"
        config = {key: value for key, value in (result.config or {}).items()}
        outcomes.append(TrialOutcome(trial_id, config, _plain(metrics), error, sae_path))
    return outcomes


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in metrics.items() if isinstance(value, (int, float, str, bool))}


def run_sweep(
    exp: ExperimentConfig,
    *,
    resume: bool = False,
    address: str | None = None,
    write: Callable[[str], None] | None = None,
) -> SweepResult:
    """Run (or with `resume`, continue) the sweep of `exp` and return its outcome.

    Connects to the Ray cluster at `address` (or RAY_ADDRESS), or starts a
    local instance on 127.0.0.1. `write` receives the live-view lines.
    """
    started = time.time()
    output_dir = Path(exp.output_dir).resolve()
    tune_root = output_dir / "tune"
    tune_path = tune_root / exp.name
    if resume and not tune_path.is_dir():
        raise FileNotFoundError(
            f"no sweep state at {tune_path}: run `python -m saesweep run` first, or check output_dir"
        )
    if not resume and tune_path.exists() and tune.Tuner.can_restore(str(tune_path)):
        raise FileExistsError(
            f"{tune_path} already holds a sweep named {exp.name!r}: continue it with "
            "`python -m saesweep resume`, or set another name (--set name=...) or output_dir"
        )

    param_space = build_param_space(exp)
    n_trials = count_trials(exp)
    namespace = f"saesweep-{exp.name}-{os.getpid()}"
    raycluster.connect(
        address,
        num_cpus=max(os.cpu_count() or 1, math.ceil(_ray_cpus_needed(exp, n_trials))),
        namespace=namespace,
    )
    namespace = ray.get_runtime_context().namespace
    routes, handles = start_servers(exp, namespace)

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, exp=exp, routes=routes),
        resources=exp.tune.resources_per_trial.to_ray(),
    )
    live = LiveView(write=write)
    run_config = tune.RunConfig(
        name=exp.name,
        storage_path=str(tune_root),
        failure_config=tune.FailureConfig(max_failures=exp.tune.max_failures),
        callbacks=[live],
        verbose=0,
    )
    if resume:
        logger.info("resuming the sweep at %s", tune_path)
        tuner = tune.Tuner.restore(
            str(tune_path), trainable=trainable, param_space=param_space, resume_unfinished=True, resume_errored=False
        )
    else:
        tuner = tune.Tuner(trainable, param_space=param_space, tune_config=build_tune_config(exp), run_config=run_config)
    try:
        results = tuner.fit()
    finally:
        stats = [ray.get(handle.stats.remote()) for handle in handles]
        for handle in handles:
            ray.kill(handle)
    n_train_servers = len(set(routes.train.values()))
    train_stats = stats[:n_train_servers]
    result = SweepResult(
        experiment=exp.name,
        tune_path=str(tune_path),
        trials=_outcomes(results),
        lm_forward_tokens=int(sum(s["lm_forward_tokens"] for s in train_stats)),
        wall_time_s=time.time() - started,
        server_stats=stats,
    )
    live.finish(result)
    (tune_path / SUMMARY_FILENAME).write_text(json.dumps(result.to_dict(), indent=2, default=str))
    return result


def heldout_metric(name: str) -> str:
    """The reported name of a metric measured on held-out text."""
    return HELDOUT_PREFIX + name
