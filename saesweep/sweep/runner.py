"""The sweep runner (Ray driver): servers up, Tune trials, results gathered."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray
from ray import tune
from ray.util.placement_group import PlacementGroup, remove_placement_group

from saesweep import raycluster
from saesweep.activations.models import model_info
from saesweep.activations.server import ServerConfig, start_server
from saesweep.evaluation.heldout import start_evaluation_server
from saesweep.experiment import ExperimentConfig
from saesweep.sweep.live import LiveView
from saesweep.sweep.placement import reserve_server_slot, server_count, trial_resources
from saesweep.sweep.space import PACK_KEY, build_param_space, build_tune_config, count_tune_trials, trial_members
from saesweep.sweep.trial import (
    MEMBERS_FILENAME,
    MEMBERS_FOLDER,
    SAE_FOLDER,
    ServerRoutes,
    TrialTracking,
    run_trial,
)
from saesweep.tracking.champions import HELDOUT_PREFIX, choose_champions, describe_policy, register_champions
from saesweep.tracking.report import write_report
from saesweep.tracking.runs import SweepTracker, log_metrics
from saesweep.tracking.settings import enable_sqlite_wal, redact, tracking_settings

logger = logging.getLogger(__name__)

SUMMARY_FILENAME = "summary.json"
FORWARD_TOKENS_FILENAME = "forward_tokens.json"


class ForwardTokenLog:
    """Keep the sweep's model forward tokens so far in its Tune folder.

    Servers count forward tokens from 0 in each run of the driver, so a resumed
    sweep adds the count that earlier runs left here. A thread of the driver reads
    the servers' counters every `interval_s` seconds, so a crash loses at most the
    tokens of one interval.
    """

    def __init__(self, handles: list[Any], tune_path: Path, resume: bool, interval_s: float = 2.0):
        self.handles = handles
        self.path = tune_path / FORWARD_TOKENS_FILENAME
        self.earlier = 0
        if resume and self.path.is_file():
            self.earlier = int(json.loads(self.path.read_text())["lm_forward_tokens"])
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="forward-token-log", daemon=True)

    def total(self, current: int) -> int:
        """Forward tokens of the whole sweep, given the count of this run's servers."""
        return self.earlier + current

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                stats = ray.get([handle.stats.remote() for handle in self.handles], timeout=30)
            except (ray.exceptions.RayError, TimeoutError) as error:
                logger.debug("activation server counters unavailable: %s", error)
                continue
            current = sum(int(s["lm_forward_tokens"]) for s in stats)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"lm_forward_tokens": self.total(current)}))


@dataclass
class TrialOutcome:
    """Outcome of one trial: its config, last metrics, error and saved SAE."""

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
    champions: dict[str, TrialOutcome] = field(default_factory=dict)
    policy_text: str = ""
    registered: dict[str, dict[str, Any]] = field(default_factory=dict)
    mlflow_parent_run_id: str | None = None

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
            "champion_policy": self.policy_text,
            "champions": {hookpoint: t.trial_id for hookpoint, t in self.champions.items()},
            "registered": self.registered,
            "mlflow_parent_run_id": self.mlflow_parent_run_id,
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


def _ray_cpus_needed(exp: ExperimentConfig, n_trials: int, servers: int) -> float:
    concurrent = min(n_trials, exp.tune.max_concurrent_trials or n_trials)
    return servers * exp.servers.resources.cpu + 0.5 + concurrent * exp.tune.resources_per_trial.cpu


def start_servers(
    exp: ExperimentConfig, namespace: str, count: int | None = None
) -> tuple[ServerRoutes, list[Any], dict[str, str], list[PlacementGroup]]:
    """Start the activation servers of `exp` and the held-out evaluation server.

    Returns the routes, the actor handles (training servers first), the Ray node id
    of the training server of each hookpoint, and the placement groups reserved for
    the training servers. `count` overrides servers.count.

    The training servers are placed before they load their model, and this returns
    without waiting for them: trials wait for their server's `ready()` themselves.
    """
    groups = split_hookpoints(exp.hookpoint_names, count or exp.servers.count)
    resources = exp.servers.resources
    handles = []
    slots = []
    train_routes: dict[str, str] = {}
    nodes: dict[str, str] = {}
    for index, group in enumerate(groups):
        name = f"activation-server-{index}"
        slot = reserve_server_slot(resources)
        logger.info(
            "starting activation server %s for %s on node %s",
            name, ", ".join(group), slot.node_id if slot else "(any)",
        )
        handles.append(
            start_server(
                _server_config(exp, group, "train"),
                name=name,
                num_cpus=resources.cpu,
                num_gpus=resources.gpu,
                resources=dict(resources.custom),
                max_restarts=exp.servers.max_restarts,
                wait=False,
                scheduling_strategy=slot.scheduling_strategy if slot else None,
            )
        )
        train_routes.update({hookpoint: name for hookpoint in group})
        if slot is not None:
            slots.append(slot.placement_group)
            nodes.update({hookpoint: slot.node_id for hookpoint in group})

    heldout_name = None
    if exp.training.eval_tokens > 0 or exp.training.ce_eval_tokens > 0:
        heldout_name = "evaluation-server"
        handles.append(
            start_evaluation_server(
                _server_config(exp, exp.hookpoint_names, "heldout"),
                exp.training.eval_tokens,
                name=heldout_name,
                num_cpus=min(0.5, resources.cpu),
                num_gpus=min(resources.gpu, 0.5) if resources.gpu else 0,
                resources={key: value / 2 for key, value in resources.custom.items()},
                max_restarts=exp.servers.max_restarts,
                ce_eval_tokens=exp.training.ce_eval_tokens,
            )
        )
    return ServerRoutes(namespace=namespace, train=train_routes, heldout=heldout_name), handles, nodes, slots


def _archive_finished_sweep(tune_path: Path, name: str) -> None:
    """Move a finished sweep's folder aside so that `run` starts a new one.

    An interrupted sweep (no summary yet) is left in place and rejected, since
    `resume` would continue it.
    """
    if not (tune_path / SUMMARY_FILENAME).is_file():
        raise FileExistsError(
            f"{tune_path} contains an unfinished sweep named {name!r}: continue it with "
            "`python -m saesweep resume`, or set another name (--set name=...) or output_dir"
        )
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime((tune_path / SUMMARY_FILENAME).stat().st_mtime))
    archived = tune_path.with_name(f"{tune_path.name}-{stamp}")
    tune_path.rename(archived)
    logger.info("the previous sweep %s finished; its results moved to %s", name, archived)


def _outcomes(results: tune.ResultGrid) -> list[TrialOutcome]:
    """Return one outcome per SAE: per trial, or per member of a trial that trained several."""
    outcomes = []
    for result in results:
        metrics = dict(result.metrics or {})
        trial_id = str(metrics.get("trial_id") or Path(result.path).name)
        error = None
        if result.error is not None:
            error = f"{type(result.error).__name__}: {result.error}".strip()
        elif not metrics.get("done"):
            error = "stopped before it finished"
        config = {key: value for key, value in (result.config or {}).items()}
        folder = Path(result.checkpoint.path) if result.checkpoint is not None and metrics.get("done") else None
        if PACK_KEY in config:
            outcomes.extend(_member_outcomes(trial_id, config, metrics, error, folder))
            continue
        sae_path = None
        if folder is not None and (folder / SAE_FOLDER).is_dir():
            sae_path = str(folder / SAE_FOLDER)
        outcomes.append(TrialOutcome(trial_id, config, _plain(metrics), error, sae_path))
    return outcomes


def _member_outcomes(
    trial_id: str, config: dict[str, Any], metrics: dict[str, Any], error: str | None, folder: Path | None
) -> list[TrialOutcome]:
    """Return the outcomes of the SAEs of a trial that trained several, from its final
    checkpoint's members.json, or from its last result when it did not finish."""
    record: dict[str, Any] = {}
    if folder is not None and (folder / MEMBERS_FILENAME).is_file():
        record = json.loads((folder / MEMBERS_FILENAME).read_text())
    last_results = metrics.get("members") or {}
    outcomes = []
    for index, member_config in enumerate(trial_members(config)):
        member_id = f"{trial_id}-{index}"
        member_metrics = record.get("metrics", {}).get(str(index)) or last_results.get(member_id) or {}
        member_error = error or record.get("errors", {}).get(str(index))
        sae_folder = folder / MEMBERS_FOLDER / str(index) / SAE_FOLDER if folder is not None else None
        sae_path = str(sae_folder) if member_error is None and sae_folder is not None and sae_folder.is_dir() else None
        outcomes.append(TrialOutcome(member_id, dict(member_config), _plain(member_metrics), member_error, sae_path))
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
    if not resume and tune_path.exists():
        _archive_finished_sweep(tune_path, exp.name)

    param_space = build_param_space(exp)
    n_trials = count_tune_trials(exp)
    info = model_info(exp.model.name, random_weights=exp.model.random_weights, **exp.model.load_options)
    n_servers = server_count(exp, info)
    namespace = f"saesweep-{exp.name}-{os.getpid()}"
    raycluster.connect(
        address,
        num_cpus=max(os.cpu_count() or 1, math.ceil(_ray_cpus_needed(exp, n_trials, n_servers))),
        namespace=namespace,
    )
    namespace = ray.get_runtime_context().namespace

    settings = tracking_settings(exp)
    tracker = None
    tracking = None
    if settings is not None:
        tracker = SweepTracker(settings, tune_path)
        parent_run_id = tracker.start(exp.name, redact(exp.to_dict()), resume=resume)
        enable_sqlite_wal(settings.tracking_uri)
        tracking = TrialTracking(settings=settings, parent_run_id=parent_run_id)

    routes, handles, nodes, slots = start_servers(exp, namespace, n_servers)
    # NOTE: a resumed sweep keeps the resource requests its trials were created
    # with, so their node preference names the servers of the first run.
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, exp=exp, routes=routes, tracking=tracking, prepend_bos=info.prepend_bos),
        resources=trial_resources(exp, nodes),
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
    n_train_servers = len(set(routes.train.values()))
    forward_log = ForwardTokenLog(handles[:n_train_servers], tune_path, resume=resume)
    forward_log.start()
    try:
        results = tuner.fit()
        forward_log.stop()
        train_stats = [_server_stats(handle) for handle in handles[:n_train_servers]]
        for handle in handles[:n_train_servers]:
            ray.kill(handle)
        result = SweepResult(
            experiment=exp.name,
            tune_path=str(tune_path),
            trials=_outcomes(results),
            lm_forward_tokens=forward_log.total(int(sum(s["lm_forward_tokens"] for s in train_stats))),
            wall_time_s=time.time() - started,
            server_stats=train_stats,
            champions={},
            policy_text=describe_policy(exp.champion),
        )
        result.champions = choose_champions(result.trials, exp.champion)
        if exp.training.ce_eval_tokens > 0 and exp.training.ce_eval_trials == "champions":
            _score_champions_spliced(result.champions, routes, tracker)
    finally:
        forward_log.stop()
        for handle in handles:
            ray.kill(handle)
        for group in slots:
            remove_placement_group(group)
    if tracker is not None:
        _finish_tracking(tracker, exp, result)
    live.finish(result)
    (tune_path / SUMMARY_FILENAME).write_text(json.dumps(result.to_dict(), indent=2, default=str))
    return result


def _server_stats(handle: Any) -> dict[str, Any]:
    """Return the counters of an activation server, or zeros when it has died."""
    try:
        return ray.get(handle.stats.remote())
    except ray.exceptions.RayActorError as error:
        logger.error("activation server unavailable after the sweep, its counters are lost: %s", error)
        return {"lm_forward_tokens": 0, "node_id": None, "hookpoints": []}


def _score_champions_spliced(
    champions: dict[str, TrialOutcome], routes: ServerRoutes, tracker: SweepTracker | None
) -> None:
    """Splice each champion's SAE into the model on the evaluation server, and add
    the CE loss and KL scores to its metrics and to its MLflow run."""
    server = ray.get_actor(routes.heldout, namespace=routes.namespace)
    child_runs = tracker.child_runs() if tracker is not None else {}
    for hookpoint, outcome in sorted(champions.items()):
        files = {path.name: path.read_bytes() for path in Path(outcome.sae_path).iterdir() if path.is_file()}
        scores = ray.get(server.spliced_scores.remote(files))
        metrics = {HELDOUT_PREFIX + name: value for name, value in scores.items()}
        outcome.metrics.update(metrics)
        logger.info(
            "champion %s of %s: CE loss score %.4f on held-out text",
            outcome.trial_id, hookpoint, scores.get("ce_loss_score", float("nan")),
        )
        run_id = child_runs.get(outcome.trial_id)
        if tracker is not None and run_id is not None:
            log_metrics(tracker.client, run_id, int(outcome.metrics.get("step", 0)), metrics)


def _finish_tracking(tracker: SweepTracker, exp: ExperimentConfig, result: SweepResult) -> None:
    """Register the champions and close the parent run with the sweep's totals."""
    result.mlflow_parent_run_id = tracker.run_id
    result.registered = register_champions(
        tracker.client,
        experiment=exp.mlflow_experiment_name,
        model_name=exp.model.name,
        champions=result.champions,
        child_runs=tracker.child_runs(),
        policy=exp.champion,
    )
    failed = [t for t in result.trials if not t.ok]
    tracker.log_metrics(
        {
            "lm_forward_tokens": result.lm_forward_tokens,
            "tokens_trained": result.tokens_trained,
            "sharing_ratio": result.sharing_ratio,
            "wall_time_s": result.wall_time_s,
            "trials_done": len(result.trials) - len(failed),
            "trials_failed": len(failed),
        }
    )
    _log_report(tracker, result)
    tracker.finish(failed=False)


def _log_report(tracker: SweepTracker, result: SweepResult) -> None:
    """Write the sweep report and log it on the parent run."""
    with tempfile.TemporaryDirectory() as folder:
        write_report(result.trials, result.champions, result.policy_text, Path(folder))
        tracker.log_artifacts(Path(folder), "report")
