"""ExperimentConfig: one validated experiment file, and its reduced smoke-test form."""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from saesweep.experiment.convert import field_docs
from saesweep.experiment.runtime import (
    ChampionSection,
    MLflowSection,
    ServersSection,
    TuneSection,
)
from saesweep.experiment.search import SAEDefaults, SearchSection, coefficient_names
from saesweep.experiment.search_values import GRID
from saesweep.experiment.sections import (
    DataSection,
    HookpointsSection,
    ModelSection,
    TrainingSection,
)

# Limits of the smoke form, small enough for a CPU run of a few seconds per trial.
SMOKE_BATCH_SIZE_TOKENS = 512
SMOKE_STEPS = 16
SMOKE_EVAL_TOKENS = 2048
SMOKE_CONTEXT_SIZE = 128
SMOKE_ARCHITECTURES = 2
SMOKE_SUFFIX = "-smoke"


@dataclass
class ExperimentConfig:
    """A sweep: SAEs for every hookpoint and search point, trained under Ray Tune."""

    name: str
    """Name of the sweep: letters, digits, '.', '_' and '-'. It names the MLflow
    experiment (unless mlflow.experiment_name is set) and the Tune run folder."""
    hookpoints: HookpointsSection
    """Hookpoints to train SAEs on: a list of hook names, or {layers, template}."""
    model: ModelSection = field(default_factory=ModelSection)
    """The language model."""
    data: DataSection = field(default_factory=DataSection)
    """The text the model reads."""
    sae: SAEDefaults = field(default_factory=SAEDefaults)
    """SAE settings shared by every trial."""
    search: SearchSection = field(default_factory=SearchSection)
    """Architectures, expansion factors and sparsity coefficients to sweep."""
    training: TrainingSection = field(default_factory=TrainingSection)
    """Training settings of each trial."""
    tune: TuneSection = field(default_factory=TuneSection)
    """Search algorithm, scheduler and resources of Ray Tune."""
    servers: ServersSection = field(default_factory=ServersSection)
    """Activation servers."""
    mlflow: MLflowSection = field(default_factory=MLflowSection)
    """MLflow tracking."""
    champion: ChampionSection = field(default_factory=ChampionSection)
    """Choice of the best SAE per hookpoint."""
    output_dir: str = "saesweep_results"
    """Folder for Tune's state, checkpoints, saved SAEs and the default MLflow store.
    Relative paths start at the working directory."""

    @property
    def hookpoint_names(self) -> list[str]:
        """The hook names to train on, in the order the file gives them."""
        return self.hookpoints.resolve()

    @property
    def mlflow_experiment_name(self) -> str:
        """mlflow.experiment_name, or the experiment's name when it is not set."""
        return self.mlflow.experiment_name or self.name

    def to_dict(self) -> dict[str, Any]:
        """Return the experiment with every default filled in, as YAML-ready plain data.

        Loading the result again gives an equal ExperimentConfig.
        """
        return _to_plain(self)

    def smoke(self) -> ExperimentConfig:
        """Return a copy cut down for a quick end-to-end check.

        The copy trains on the first hookpoint only, the first two architectures
        with one coefficient each, the smallest expansion factor, and a few
        hundred activation vectors per step for a few steps. It keeps the model,
        data source, search algorithm, scheduler and resources, and its name
        ends in "-smoke" so that its runs and results stay apart.
        """
        smoke = copy.deepcopy(self)
        smoke.name = self.name + SMOKE_SUFFIX
        if smoke.mlflow.experiment_name:
            smoke.mlflow.experiment_name += SMOKE_SUFFIX
        smoke.hookpoints = HookpointsSection(names=self.hookpoint_names[:1])
        smoke.data.context_size = min(self.data.context_size, SMOKE_CONTEXT_SIZE)
        _cut_search(smoke.search, self.tune.search_alg)
        _cut_training(smoke.training)
        smoke.tune.asha.grace_period_tokens = min(
            smoke.tune.asha.grace_period_tokens, smoke.training.tokens_per_trial // 4
        )
        smoke.servers.sequences_per_batch = min(smoke.servers.sequences_per_batch, 4)
        smoke.servers.shuffle_buffer_tokens = min(
            smoke.servers.shuffle_buffer_tokens, 2 * smoke.training.batch_size_tokens
        )
        smoke.servers.normalization_tokens = min(
            smoke.servers.normalization_tokens, 4 * SMOKE_BATCH_SIZE_TOKENS
        )
        return smoke


def _cut_search(search: Any, search_alg: str) -> None:
    search.architectures = search.architectures[:SMOKE_ARCHITECTURES]
    search.expansion_factors = type(search.expansion_factors)(
        GRID, (int(search.expansion_factors.lowest),)
    )
    used = {_coefficient_of(architecture) for architecture in search.architectures}
    for name in coefficient_names():
        value = getattr(search, name)
        if value is None:
            continue
        if name not in used:
            setattr(search, name, None)
        else:
            setattr(search, name, type(value)(GRID, (value.representative(),)))
    search.num_samples = 1


def _coefficient_of(architecture: str) -> str | None:
    from saesweep.saes import get_architecture, list_architectures

    if architecture not in list_architectures():
        return None
    return get_architecture(architecture).sparsity_coefficient


def _cut_training(training: TrainingSection) -> None:
    training.batch_size_tokens = min(training.batch_size_tokens, SMOKE_BATCH_SIZE_TOKENS)
    training.tokens_per_trial = min(
        training.tokens_per_trial, SMOKE_STEPS * training.batch_size_tokens
    )
    steps = training.total_steps
    training.lr_warmup_steps = min(training.lr_warmup_steps, steps // 4)
    if training.lr_decay_steps is not None:
        training.lr_decay_steps = min(training.lr_decay_steps, steps // 4)
    training.sparsity_warmup_steps = min(training.sparsity_warmup_steps, steps // 4)
    training.dead_latent_window_tokens = min(
        training.dead_latent_window_tokens, training.tokens_per_trial
    )
    training.log_every_steps = min(training.log_every_steps, 4)
    if training.checkpoint_every_steps:
        training.checkpoint_every_steps = min(training.checkpoint_every_steps, steps // 2)
    training.eval_tokens = min(training.eval_tokens, SMOKE_EVAL_TOKENS)
    training.ce_eval_tokens = min(training.ce_eval_tokens, SMOKE_CONTEXT_SIZE * 4)


def _to_plain(value: Any) -> Any:
    if hasattr(value, "to_yaml"):
        return _to_plain(value.to_yaml())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            item.name: _to_plain(getattr(value, item.name))
            for item in dataclasses.fields(value)
            if item.init
        }
    if isinstance(value, (list, tuple)):
        return [_to_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _to_plain(item) for key, item in value.items()}
    return value


_INDEX = re.compile(r"\[\d+\]")


def field_help(path: str) -> str:
    """Return the documentation of the experiment field at the dotted `path`, or ''."""
    cls: Any = ExperimentConfig
    parts = _INDEX.sub("", path).split(".")
    doc = ""
    for part in parts:
        if not dataclasses.is_dataclass(cls):
            return doc
        doc = field_docs(cls).get(part, "")
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return ""
        cls = section_type(hints[part])
    return doc


def section_type(hint: Any) -> Any:
    """Return the dataclass named by `hint`, looking inside `X | None` and at the
    `mapping_form` of custom YAML types, or None."""
    for candidate in (hint, *typing.get_args(hint)):
        candidate = getattr(candidate, "mapping_form", candidate)
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None
