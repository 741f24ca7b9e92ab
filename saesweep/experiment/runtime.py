"""Experiment sections that define how the sweep runs: Tune, servers, MLflow, champions."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


@dataclass
class Resources:
    """Ray resources requested by one actor or trial. Fractions let several share a device."""

    cpu: float = 1.0
    """Logical CPUs, fractions such as 0.5 included."""
    gpu: float = 0.0
    """GPUs. A fraction below 1 (e.g. 0.25) lets several trials share one GPU, and
    a request above 1 must be a whole number."""
    custom: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources, e.g. {activation_server: 1}, that the cluster's nodes
    declare so that Ray places the work on them."""

    def to_ray(self) -> dict[str, float]:
        """Return the request as a Ray resource dict ({"CPU": ..., "GPU": ..., custom...})."""
        request = {"CPU": self.cpu, "GPU": self.gpu}
        request.update(self.custom)
        return request


@dataclass
class AshaSection:
    """Options of the ASHA scheduler, which stops trials that fall behind early.

    Progress is measured in trained tokens (the reported `tokens_trained`), and
    the last rung is training.tokens_per_trial.
    """

    grace_period_tokens: int = 1_000_000
    """Tokens every trial trains on before ASHA may stop it."""
    reduction_factor: float = 4.0
    """Only the best 1/reduction_factor of the trials at a rung continue."""
    brackets: int = 1
    """Number of ASHA brackets."""


@dataclass
class TuneSection:
    """Search algorithm, scheduler and resources of Ray Tune."""

    search_alg: Literal["grid", "random", "optuna"] = "grid"
    """grid: every grid point once. random: values sampled by Tune (grid lists are
    still enumerated). optuna: Optuna's TPE sampler chooses hookpoint, architecture
    and values, so every list must then be written {choice: [...]}."""
    scheduler: Literal["fifo", "asha"] = "fifo"
    """fifo runs every trial to the end, while asha stops weak trials early (see asha)."""
    asha: AshaSection = field(default_factory=AshaSection)
    """Options of the asha scheduler."""
    max_concurrent_trials: int | None = None
    """Maximum trials running at once, or null to let the resources decide."""
    resources_per_trial: Resources = field(default_factory=Resources)
    """Resources of one trial (the process that trains its SAEs)."""
    saes_per_trial: int = 1
    """SAEs of one hookpoint that one trial trains together, in one process and on
    the same activation batches. Each SAE still gets its own MLflow run, result and
    file. Above 1 this saves each SAE the start-up of a trial process (torch, Ray and
    MLflow imports, shuffle buffer) and, on few cores, the contention of many
    processes. It needs search_alg grid or random and scheduler fifo, since Optuna
    and ASHA decide about one SAE at a time."""
    prefer_server_node: bool = True
    """Start each trial on the node of the activation server for its hookpoint when
    that node has the trial's resources free, so that activations cross the network
    only when they must. A trial goes to another node when that one is full; false
    leaves placement to Ray."""
    metric: str = "explained_variance"
    """Reported metric that the search algorithm and scheduler optimize."""
    mode: Literal["max", "min"] = "max"
    """Whether a higher (max) or lower (min) metric is better."""
    seed: int = 0
    """Seed of the random and optuna search algorithms."""
    max_failures: int = 0
    """Times Tune restarts a failed trial from its last checkpoint before giving up on it."""


@dataclass
class ServersSection:
    """Activation servers: Ray actors that run the model and serve activations to trials."""

    count: int = 1
    """Number of activation servers, which divide the hookpoints among them."""
    resources: Resources = field(default_factory=Resources)
    """Resources of one server, e.g. {cpu: 1, gpu: 1, custom: {activation_server: 1}}."""
    sequences_per_batch: int = 8
    """Sequences per model forward pass."""
    max_batches_in_flight: int = 4
    """Forward batches a server keeps for its subscribers. When the slowest trial is
    this many batches behind, the server waits."""
    max_batch_memory_gb: float | None = None
    """Largest size in GiB of the activation batches that one server keeps in its
    node's object store: max_batches_in_flight batches of every hookpoint it serves.
    When set, the sweep starts more servers than `count` where needed, so that each
    server's group of hookpoints fits. Null keeps `count`."""
    shuffle_buffer_tokens: int = 16_384
    """Activation vectors each trial keeps to mix tokens across sequences before
    drawing a training batch. It must be at least training.batch_size_tokens."""
    normalization_tokens: int = 65_536
    """Activation vectors a server reads to estimate the normalization scale of a
    hookpoint (sae.normalize_activations: expected_average_only_in)."""
    max_restarts: int = 3
    """Times Ray restarts a server that died. Its trials then subscribe again."""


@dataclass
class MLflowSection:
    """MLflow tracking of the sweep: one parent run, one child run per trial.

    The tracking URI is chosen in this order: the MLFLOW_TRACKING_URI environment
    variable when set, then tracking_uri, then a SQLite store in output_dir.
    The environment wins so that one experiment file runs unchanged on a laptop
    and on a cluster whose head node exports the URI of its MLflow server.
    """

    enabled: bool = True
    """Log runs, metrics and SAEs to MLflow. With false, only Tune's results remain."""
    experiment_name: str | None = None
    """MLflow experiment name, or null to use the experiment's name."""
    tracking_uri: str | None = None
    """Tracking URI (e.g. http://127.0.0.1:5000 or sqlite:///mlflow.db), used when
    MLFLOW_TRACKING_URI is not set. Null means a SQLite store in output_dir."""
    artifact_location: str | None = None
    """Artifact folder or URI for a new MLflow experiment. Null means
    output_dir/mlartifacts with the default store, or the server's default."""

    def resolve_tracking_uri(
        self, output_dir: str | Path, environ: Mapping[str, str] | None = None
    ) -> str:
        """Return the tracking URI to use, following the order in the class docstring."""
        environ = os.environ if environ is None else environ
        if environ.get(TRACKING_URI_ENV):
            return environ[TRACKING_URI_ENV]
        if self.tracking_uri:
            return self.tracking_uri
        return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"

    def resolve_artifact_location(
        self, output_dir: str | Path, environ: Mapping[str, str] | None = None
    ) -> str | None:
        """Return the artifact location for a new experiment, or None to leave it to the server."""
        if self.artifact_location:
            return self.artifact_location
        environ = os.environ if environ is None else environ
        if environ.get(TRACKING_URI_ENV) or self.tracking_uri:
            return None
        return (Path(output_dir).resolve() / "mlartifacts").as_uri()


@dataclass
class ChampionSection:
    """Policy that chooses the best SAE of each hookpoint after the sweep."""

    policy: Literal[
        "max_explained_variance_at_l0", "max_ce_loss_score_at_l0", "weighted_score"
    ] = "max_explained_variance_at_l0"
    """max_explained_variance_at_l0: the highest explained variance among SAEs whose
    L0 is at most l0_max. max_ce_loss_score_at_l0: the highest CE loss score among
    SAEs whose L0 is at most l0_max. The CE loss score is the share of the CE loss
    increase of zero ablation that the spliced SAE avoids, and only trials with
    training.ce_eval_tokens above 0 report it. weighted_score: the highest sum of
    weight * metric over `weights`."""
    l0_max: float | None = None
    """Maximum mean L0 (active latents per token) of a champion
    (max_explained_variance_at_l0, max_ce_loss_score_at_l0)."""
    weights: dict[str, float] = field(default_factory=dict)
    """Metric name -> weight for weighted_score, e.g. {explained_variance: 1.0,
    l0: -0.001}. Use negative weights for metrics where lower is better."""
    explained_variance_metric: str = "explained_variance"
    """Reported metric read as the explained variance."""
    ce_loss_score_metric: str = "ce_loss_score"
    """Reported metric read as the CE loss score (max_ce_loss_score_at_l0)."""
    l0_metric: str = "l0"
    """Reported metric read as the L0."""

    def metrics_read(self) -> list[str]:
        """Return the names of the metrics that the policy scores trials by."""
        if self.policy == "max_explained_variance_at_l0":
            return [self.explained_variance_metric, self.l0_metric]
        if self.policy == "max_ce_loss_score_at_l0":
            return [self.ce_loss_score_metric, self.l0_metric]
        return list(self.weights)

    def spliced_metrics_read(self) -> list[str]:
        """Return the metrics read by the policy that only the spliced evaluation
        (training.ce_eval_tokens > 0) reports: ce_loss_* and kl_div_*, with or
        without the heldout_ prefix."""
        spliced = []
        for name in self.metrics_read():
            bare = name.removeprefix("heldout_")
            if bare.startswith(("ce_loss_", "kl_div_")):
                spliced.append(name)
        return spliced
