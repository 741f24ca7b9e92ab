"""The Ray Tune search space, search algorithm and scheduler of an experiment.

A trial config contains `hookpoint`, `architecture`, `expansion_factor` and one
key per sparsity coefficient (`l1_coefficient`, `l0_coefficient`, `k`, ...).
The coefficient of the trial's architecture contains its value and the others
are None, so that an L1 coefficient is never crossed with a topk SAE. Grid and
random trials also carry the nested `sae` entry that Tune expanded.

Grid and random search run on Tune's BasicVariantGenerator with a param_space
from `build_param_space`. Optuna cannot read a conditional param_space, so its
searcher gets a define-by-run function (`OptunaSpace`) and the param_space
stays empty.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter, SearchAlgorithm, Searcher
from ray.tune.search.basic_variant import BasicVariantGenerator

from saesweep.experiment.search import coefficient_names
from saesweep.experiment.search_values import CHOICE, GRID, LOGUNIFORM, SearchValue
from saesweep.saes import SAEConfig, get_architecture

if TYPE_CHECKING:
    from saesweep.experiment import ExperimentConfig

TOKENS_TRAINED = "tokens_trained"
"""Reported metric that counts a trial's training progress (ASHA's time attribute)."""

PACK_KEY = "pack"
"""Trial config key of the SAE configs that one trial trains together, when
tune.saes_per_trial is above 1; see `build_packs`."""

SAE_KEY = "sae"
"""Trial config key of the architecture and its coefficient as Tune expanded them,
in grid and random search. The same values are also at the top level."""


def _coefficient_of(architecture: str) -> str:
    return get_architecture(architecture).sparsity_coefficient


def build_param_space(exp: ExperimentConfig) -> dict[str, Any]:
    """Return the `param_space` for `tune.Tuner`: hookpoint x architecture x
    expansion_factor x that architecture's coefficient.

    Empty for optuna, whose space is in the searcher (see `build_search_alg`).
    With tune.saes_per_trial above 1 it is a grid over the packs of `build_packs`.
    """
    if exp.tune.search_alg == "optuna":
        return {}
    if exp.tune.saes_per_trial > 1:
        return {
            PACK_KEY: tune.grid_search(build_packs(exp)),
            "hookpoint": tune.sample_from(FromPack("hookpoint")),
        }
    return _sae_param_space(exp)


def _sae_param_space(exp: ExperimentConfig) -> dict[str, Any]:
    """Return the param_space of a sweep with one SAE per trial (grid and random search)."""
    search = exp.search
    # One grid entry per architecture, each with only its own coefficient, so
    # Tune crosses a coefficient's values only with its architecture. Tune expands
    # grids and samples distributions nested in a grid entry.
    per_architecture = []
    for architecture in search.architectures:
        coefficient = _coefficient_of(architecture)
        per_architecture.append(
            {"architecture": architecture, coefficient: _to_tune(getattr(search, coefficient))}
        )
    space: dict[str, Any] = {
        "hookpoint": tune.grid_search(exp.hookpoint_names),
        "expansion_factor": _to_tune(search.expansion_factors),
        SAE_KEY: tune.grid_search(per_architecture),
        "architecture": tune.sample_from(FromSAEKey("architecture")),
    }
    for coefficient in coefficient_names():
        space[coefficient] = tune.sample_from(FromSAEKey(coefficient))
    return space


def build_packs(exp: ExperimentConfig) -> list[dict[str, Any]]:
    """Group the SAE configs of a grid or random sweep into packs for one trial each.

    `sae_configs` lists every config. The configs of each hookpoint are split into
    the fewest packs of at most tune.saes_per_trial, of nearly equal size. A pack is
    {"hookpoint": name, "members": [config, ...]}.
    """
    per_hookpoint: dict[str, list[dict[str, Any]]] = {name: [] for name in exp.hookpoint_names}
    for config in sae_configs(exp):
        per_hookpoint[config["hookpoint"]].append(config)
    packs = []
    for hookpoint, configs in per_hookpoint.items():
        count = math.ceil(len(configs) / exp.tune.saes_per_trial)
        size, extra = divmod(len(configs), count)
        start = 0
        for index in range(count):
            end = start + size + (1 if index < extra else 0)
            packs.append({"hookpoint": hookpoint, "members": configs[start:end]})
            start = end
    return packs


def sae_configs(exp: ExperimentConfig) -> list[dict[str, Any]]:
    """Return every SAE config of a grid or random sweep, in the format of Tune's trial configs.

    Grid lists are enumerated. In random search, each of search.num_samples rounds
    draws every other value anew for each combination of the grid values before
    it, seeded by tune.seed, as Tune draws them for each trial.
    """
    search = exp.search
    rng = np.random.default_rng(exp.tune.seed)
    rounds = search.num_samples if exp.tune.search_alg == "random" else 1
    configs = []
    for _ in range(rounds):
        for hookpoint in exp.hookpoint_names:
            for architecture in search.architectures:
                coefficient = _coefficient_of(architecture)
                for expansion_factor in _values_of_one_round(search.expansion_factors, rng):
                    for value in _values_of_one_round(getattr(search, coefficient), rng):
                        config: dict[str, Any] = {
                            "hookpoint": hookpoint,
                            "expansion_factor": expansion_factor,
                            SAE_KEY: {"architecture": architecture, coefficient: value},
                            "architecture": architecture,
                        }
                        config.update({name: None for name in coefficient_names()})
                        config[coefficient] = value
                        configs.append(config)
    return configs


def _values_of_one_round(value: SearchValue, rng: np.random.Generator) -> list[Any]:
    """Return every value of a grid list, or one draw of a choice or log-uniform range
    (whose upper bound is included)."""
    values = list(value.values)
    if value.kind == GRID:
        return values
    if value.kind == CHOICE:
        return [values[int(rng.integers(len(values)))]]
    low, high = values
    if value.element_type is int:
        drawn = math.exp(rng.uniform(math.log(low), math.log(high + 1)))
        return [min(int(high), int(drawn))]
    return [float(math.exp(rng.uniform(math.log(low), math.log(high))))]


def trial_members(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the SAE configs that a trial with Tune config `config` trains."""
    if PACK_KEY in config:
        return list(config[PACK_KEY]["members"])
    return [config]


@dataclass(frozen=True)
class FromPack:
    """Tune `sample_from` function that copies `config[PACK_KEY][key]` to the top level."""

    key: str

    def __call__(self, config: dict[str, Any]) -> Any:
        return config[PACK_KEY][self.key]


@dataclass(frozen=True)
class FromSAEKey:
    """Tune `sample_from` function that copies `config[SAE_KEY][key]` to the top level.

    Tune resolves `sample_from` values after it has expanded every grid and
    sampled every distribution, so the nested value is final here. A key that the
    trial's architecture does not use gives None.
    """

    key: str

    def __call__(self, config: dict[str, Any]) -> Any:
        return config[SAE_KEY].get(self.key)


def _to_tune(value: SearchValue) -> Any:
    """Translate a SearchValue into a Tune grid, domain or constant."""
    values = list(value.values)
    if value.kind == GRID:
        return values[0] if len(values) == 1 else tune.grid_search(values)
    if value.kind == CHOICE:
        return tune.choice(values)
    low, high = values
    if value.element_type is int:
        # tune.lograndint excludes its upper bound, but the experiment's range includes it.
        return tune.lograndint(int(low), int(high) + 1)
    return tune.loguniform(low, high)


@dataclass(frozen=True)
class OptunaSpace:
    """Define-by-run search space for OptunaSearch, conditional on the architecture.

    Optuna names a coefficient parameter after the coefficient when one
    architecture uses it, and `<coefficient>.<architecture>` when several do
    (e.g. `l1_coefficient.standard`), because Optuna requires one distribution
    per parameter name. The trial config carries the value under the plain
    coefficient name either way.
    """

    hookpoints: tuple[str, ...]
    architectures: tuple[str, ...]
    expansion_factors: SearchValue
    coefficients: dict[str, SearchValue]
    """Architecture name -> search value of its coefficient."""

    def __call__(self, trial: Any) -> dict[str, Any]:
        constants: dict[str, Any] = {}
        _suggest(trial, "hookpoint", SearchValue(CHOICE, self.hookpoints), constants)
        architecture = _suggest(
            trial, "architecture", SearchValue(CHOICE, self.architectures), constants
        )
        _suggest(trial, "expansion_factor", self.expansion_factors, constants)

        coefficient = _coefficient_of(architecture)
        sharing = [a for a in self.architectures if _coefficient_of(a) == coefficient]
        name = coefficient if len(sharing) == 1 else f"{coefficient}.{architecture}"
        value = _suggest(trial, name, self.coefficients[architecture], constants)
        for other in coefficient_names():
            constants.setdefault(other, None)
        constants[coefficient] = value
        return constants


def _suggest(trial: Any, name: str, value: SearchValue, constants: dict[str, Any]) -> Any:
    """Ask Optuna for `name`, or put it in `constants` when it has a single value."""
    values = list(value.values)
    if value.kind in (GRID, CHOICE) and len(values) == 1:
        constants[name] = values[0]
        return values[0]
    if value.kind == LOGUNIFORM:
        low, high = values
        if value.element_type is int:
            return trial.suggest_int(name, int(low), int(high), log=True)
        return trial.suggest_float(name, low, high, log=True)
    return trial.suggest_categorical(name, values)


def build_search_alg(exp: ExperimentConfig) -> SearchAlgorithm | Searcher:
    """Return Tune's search algorithm: a seeded BasicVariantGenerator for grid and
    random search, or OptunaSearch (in a ConcurrencyLimiter when
    tune.max_concurrent_trials is set)."""
    settings = exp.tune
    if settings.search_alg != "optuna":
        return BasicVariantGenerator(
            max_concurrent=settings.max_concurrent_trials or 0, random_state=settings.seed
        )

    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as error:
        raise ImportError(
            "tune.search_alg: optuna needs the optuna package: pip install optuna"
        ) from error
    search = exp.search
    space = OptunaSpace(
        hookpoints=tuple(exp.hookpoint_names),
        architectures=tuple(search.architectures),
        expansion_factors=search.expansion_factors,
        coefficients={
            architecture: getattr(search, _coefficient_of(architecture))
            for architecture in search.architectures
        },
    )
    searcher = OptunaSearch(
        space=space, metric=settings.metric, mode=settings.mode, seed=settings.seed
    )
    if settings.max_concurrent_trials:
        return ConcurrencyLimiter(searcher, max_concurrent=settings.max_concurrent_trials)
    return searcher


def build_scheduler(exp: ExperimentConfig) -> TrialScheduler:
    """Return FIFO, or ASHA over trained tokens. Metric and mode come from the TuneConfig."""
    if exp.tune.scheduler == "fifo":
        return FIFOScheduler()
    asha = exp.tune.asha
    return ASHAScheduler(
        time_attr=TOKENS_TRAINED,
        max_t=exp.training.tokens_per_trial,
        grace_period=asha.grace_period_tokens,
        reduction_factor=asha.reduction_factor,
        brackets=asha.brackets,
    )


def num_samples(exp: ExperimentConfig) -> int:
    """Return Tune's `num_samples`: 1 for grid and for packed sweeps (whose packs hold
    every sample), search.num_samples for random, and search.num_samples per
    hookpoint and architecture for optuna."""
    algorithm = exp.tune.search_alg
    if algorithm == "grid" or (algorithm == "random" and exp.tune.saes_per_trial > 1):
        return 1
    if algorithm == "random":
        return exp.search.num_samples
    return exp.search.num_samples * len(exp.hookpoint_names) * len(exp.search.architectures)


def count_tune_trials(exp: ExperimentConfig) -> int:
    """Return the number of Tune trials (processes) the sweep runs: one per SAE, or
    one per pack of up to tune.saes_per_trial SAEs of a hookpoint."""
    n_saes = count_trials(exp)
    if exp.tune.saes_per_trial <= 1:
        return n_saes
    per_hookpoint = n_saes // len(exp.hookpoint_names)
    return len(exp.hookpoint_names) * math.ceil(per_hookpoint / exp.tune.saes_per_trial)


def count_trials(exp: ExperimentConfig) -> int:
    """Return the number of SAEs the sweep trains (without ASHA stopping any early)."""
    if exp.tune.search_alg == "optuna":
        return num_samples(exp)
    search = exp.search
    per_hookpoint = 0
    for architecture in search.architectures:
        coefficient = getattr(search, _coefficient_of(architecture))
        per_hookpoint += _grid_size(search.expansion_factors) * _grid_size(coefficient)
    samples = exp.search.num_samples if exp.tune.search_alg == "random" else 1
    return samples * len(exp.hookpoint_names) * per_hookpoint


def _grid_size(value: SearchValue) -> int:
    return len(value.values) if value.kind == GRID else 1


def build_tune_config(exp: ExperimentConfig) -> tune.TuneConfig:
    """Return the TuneConfig of the sweep: metric, mode, search algorithm, scheduler
    and num_samples. The concurrency limit is inside the search algorithm."""
    return tune.TuneConfig(
        metric=exp.tune.metric,
        mode=exp.tune.mode,
        search_alg=build_search_alg(exp),
        scheduler=build_scheduler(exp),
        num_samples=num_samples(exp),
        trial_dirname_creator=pack_dirname if exp.tune.saes_per_trial > 1 else None,
    )


def pack_dirname(trial: Any) -> str:
    """Return the folder name of a trial that trains several SAEs. Tune's default would spell
    out every member config, and Tune creates the folder before it resolves the config."""
    return f"pack_{trial.trial_id}"


def trial_sae_config(
    exp: ExperimentConfig, config: dict[str, Any], *, d_in: int, **metadata: Any
) -> SAEConfig:
    """Build the SAEConfig of one trial from its Tune `config`.

    `d_in` is the hookpoint's width (the model's d_model). `metadata` sets further
    SAEConfig fields such as prepend_bos or metadata.
    """
    architecture = config["architecture"]
    coefficient = _coefficient_of(architecture)
    coefficient_type = typing.get_type_hints(SAEConfig)[coefficient]
    fields = {
        "architecture": architecture,
        "d_in": d_in,
        "d_sae": d_in * int(config["expansion_factor"]),
        "seed": exp.training.seed,
        coefficient: coefficient_type(config[coefficient]),
        "model_name": exp.model.name,
        "hook_name": config["hookpoint"],
        "context_size": exp.data.context_size,
        "dataset_path": exp.data.dataset,
        "model_from_pretrained_kwargs": dict(exp.model.load_options),
    }
    fields.update(dataclasses.asdict(exp.sae))
    fields.update(metadata)
    return SAEConfig(**fields)
