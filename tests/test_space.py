"""The Tune search space: exact grid expansion, conditional coefficients, Optuna, schedulers."""

from __future__ import annotations

import collections
import copy
import math
from pathlib import Path

import pytest
from ray.tune.experiment import Experiment
from ray.tune.impl.placeholder import create_resolvers_map, inject_placeholders
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from saesweep.experiment import load_experiment, parse_experiment
from saesweep.saes import get_architecture
from saesweep.sweep import (
    TOKENS_TRAINED,
    build_packs,
    build_param_space,
    build_scheduler,
    build_search_alg,
    build_tune_config,
    count_trials,
    count_tune_trials,
    num_samples,
    trial_sae_config,
)
from saesweep.sweep.space import PACK_KEY, trial_members

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
COEFFICIENTS = ("l1_coefficient", "l0_coefficient", "k")

BASE = {
    "name": "space",
    "hookpoints": ["blocks.1.hook_resid_pre", "blocks.4.hook_resid_pre"],
    "search": {
        "architectures": ["topk", "standard", "jumprelu"],
        "expansion_factors": [2, 4],
        "k": [16, 32],
        "l1_coefficient": [1.0, 5.0, 10.0],
        "l0_coefficient": [0.5],
    },
    "training": {
        "tokens_per_trial": 65536,
        "batch_size_tokens": 1024,
        "dead_latent_window_tokens": 32768,
    },
    "champion": {"l0_max": 64},
}


def experiment(changes: dict | None = None):
    data = copy.deepcopy(BASE)
    for section, values in (changes or {}).items():
        data.setdefault(section, {}).update(values)
    return parse_experiment(data, check_model=False)


def start_generator(exp) -> tuple[BasicVariantGenerator, dict]:
    """Return the sweep's variant generator with the param_space added, and its resolvers."""
    generator = build_search_alg(exp)
    assert isinstance(generator, BasicVariantGenerator)
    resolvers = create_resolvers_map()
    space = inject_placeholders(build_param_space(exp), resolvers)
    generator.add_configurations(
        [Experiment("space", lambda config: None, config=space, num_samples=num_samples(exp))]
    )
    return generator, resolvers


def expand(exp) -> list[dict]:
    """Generate every trial config of a grid or random sweep without running anything.

    Follows the steps of `tune.Tuner.fit` in Ray 2.60: `sample_from` values are
    replaced by placeholders before the variant generator expands the space, and
    resolved on each trial's expanded config afterwards.
    """
    generator, resolvers = start_generator(exp)
    configs = []
    while (trial := generator.next_trial()) is not None:
        trial.resolve_config_placeholders(resolvers)
        configs.append(trial.config)
        # Finishing each trial frees its max_concurrent_trials slot.
        generator.on_trial_complete(trial.trial_id)
    assert generator.is_finished()
    return configs


def key(config: dict) -> tuple:
    return (config["hookpoint"], config["architecture"], config["expansion_factor"]) + tuple(
        config[name] for name in COEFFICIENTS
    )


def test_grid_has_exactly_expected_trials():
    exp = experiment()
    configs = expand(exp)

    expected = set()
    for hookpoint in BASE["hookpoints"]:
        for factor in (2, 4):
            for k in (16, 32):
                expected.add((hookpoint, "topk", factor, None, None, k))
            for l1 in (1.0, 5.0, 10.0):
                expected.add((hookpoint, "standard", factor, l1, None, None))
            expected.add((hookpoint, "jumprelu", factor, None, 0.5, None))
    keys = [key(config) for config in configs]
    assert len(keys) == len(set(keys))
    assert set(keys) == expected
    assert len(configs) == count_trials(exp) == 2 * 2 * (2 + 3 + 1)


def test_coefficients_follow_architecture():
    configs = expand(experiment({"search": {"architectures": ["standard", "gated", "topk", "batchtopk"]}}))

    for config in configs:
        own = get_architecture(config["architecture"]).sparsity_coefficient
        assert config[own] is not None
        for other in COEFFICIENTS:
            if other != own:
                assert config[other] is None, config
    by_architecture = collections.Counter(config["architecture"] for config in configs)
    # Three L1 values for standard and gated, two k values for topk and batchtopk.
    assert by_architecture == {"standard": 12, "gated": 12, "topk": 8, "batchtopk": 8}


def test_example_grids_match_count():
    for file_name, expected in (("quickstart.yaml", 9), ("gpt2_all_layers.yaml", 432)):
        exp = load_experiment(EXPERIMENTS / file_name, check_model=False)
        configs = [member for trial in expand(exp) for member in trial_members(trial)]

        assert len(configs) == expected
        assert count_trials(exp) == expected
        assert len({key(config) for config in configs}) == expected


def test_random_search_samples_within_ranges():
    exp = experiment(
        {
            "tune": {"search_alg": "random", "seed": 3},
            "search": {
                "num_samples": 5,
                "k": {"loguniform": [8, 64]},
                "l1_coefficient": {"loguniform": [0.1, 10.0]},
                "l0_coefficient": {"choice": [0.5, 2.0]},
                "expansion_factors": [2, 4],
            },
        }
    )
    configs = expand(exp)

    # Hookpoints, architectures and the expansion-factor list are grids, and num_samples
    # repeats each grid point.
    assert len(configs) == count_trials(exp) == 5 * 2 * 3 * 2
    for config in configs:
        if config["architecture"] == "topk":
            assert isinstance(config["k"], int)
            assert 8 <= config["k"] <= 64
        elif config["architecture"] == "standard":
            assert 0.1 <= config["l1_coefficient"] <= 10.0
        else:
            assert config["l0_coefficient"] in (0.5, 2.0)
    k_values = {config["k"] for config in configs if config["k"] is not None}
    assert len(k_values) > 3
    # Seeded: the same experiment expands to the same trials.
    assert [key(config) for config in expand(exp)] == [key(config) for config in configs]


def test_single_values_are_constants():
    exp = experiment({"search": {"expansion_factors": [4], "k": [32], "architectures": ["topk"]}})
    space = build_param_space(exp)

    assert space["expansion_factor"] == 4
    assert space["sae"] == {"grid_search": [{"architecture": "topk", "k": 32}]}
    assert [key(config) for config in expand(exp)] == [
        (hookpoint, "topk", 4, None, None, 32) for hookpoint in BASE["hookpoints"]
    ]


def test_concurrency_limit_on_grid():
    exp = experiment({"tune": {"max_concurrent_trials": 3}})
    generator, _ = start_generator(exp)
    started = [generator.next_trial() for _ in range(4)]

    assert all(trial is not None for trial in started[:3])
    assert started[3] is None


def optuna_experiment(**tune_options):
    return experiment(
        {
            "tune": {"search_alg": "optuna", "seed": 7, **tune_options},
            "search": {
                "architectures": ["topk", "standard", "gated"],
                "num_samples": 2,
                "expansion_factors": {"choice": [2, 4]},
                "k": {"loguniform": [8, 64]},
                "l1_coefficient": {"loguniform": [0.1, 10.0]},
                "l0_coefficient": None,
            },
        }
    )


def test_optuna_space_is_conditional():
    exp = optuna_experiment()
    searcher = build_search_alg(exp)

    assert isinstance(searcher, OptunaSearch)
    assert build_param_space(exp) == {}
    assert num_samples(exp) == count_trials(exp) == 2 * 2 * 3
    configs = [searcher.suggest(f"trial-{index}") for index in range(30)]
    assert {config["architecture"] for config in configs} == {"topk", "standard", "gated"}
    assert {config["hookpoint"] for config in configs} == set(BASE["hookpoints"])
    for config in configs:
        assert config["expansion_factor"] in (2, 4)
        assert config["l0_coefficient"] is None
        if config["architecture"] == "topk":
            assert config["l1_coefficient"] is None
            assert 8 <= config["k"] <= 64
        else:
            assert config["k"] is None
            assert 0.1 <= config["l1_coefficient"] <= 10.0
            # Two architectures share l1_coefficient, so Optuna names it per architecture.
            assert config[f"l1_coefficient.{config['architecture']}"] == config["l1_coefficient"]


def test_optuna_concurrency_limiter():
    searcher = build_search_alg(optuna_experiment(max_concurrent_trials=2))

    assert isinstance(searcher, ConcurrencyLimiter)
    assert searcher.max_concurrent == 2
    assert isinstance(searcher.searcher, OptunaSearch)
    assert searcher.suggest("a") is not None
    assert searcher.suggest("b") is not None
    assert searcher.suggest("c") is None


def test_schedulers():
    assert isinstance(build_scheduler(experiment()), FIFOScheduler)

    exp = experiment(
        {"tune": {"scheduler": "asha", "asha": {"grace_period_tokens": 8192, "reduction_factor": 2}}}
    )
    scheduler = build_scheduler(exp)
    assert isinstance(scheduler, ASHAScheduler)
    assert scheduler._time_attr == TOKENS_TRAINED
    assert scheduler._max_t == 65536
    assert scheduler._reduction_factor == 2


def test_trial_sae_config():
    exp = load_experiment(EXPERIMENTS / "quickstart.yaml", check_model=False)
    for config in (member for trial in expand(exp) for member in trial_members(trial)):
        cfg = trial_sae_config(exp, config, d_in=576, prepend_bos=False)
        coefficient = get_architecture(config["architecture"]).sparsity_coefficient

        assert cfg.architecture == config["architecture"]
        assert cfg.d_sae == 576 * config["expansion_factor"]
        assert getattr(cfg, coefficient) == config[coefficient]
        assert cfg.hook_name == config["hookpoint"]
        assert cfg.model_name == "smollm2-135m"
        assert cfg.normalize_activations == "expected_average_only_in"
        assert cfg.prepend_bos is False


@pytest.mark.slow
@pytest.mark.parametrize(
    "tune_options",
    [
        {"search_alg": "grid", "scheduler": "asha", "max_concurrent_trials": 2,
         "asha": {"grace_period_tokens": 16384, "reduction_factor": 2}},
        {"search_alg": "optuna", "scheduler": "fifo", "max_concurrent_trials": 2},
    ],
    ids=["grid-asha", "optuna-fifo"],
)
def test_tuner_runs_space(ray_session, tmp_path, tune_options):
    from ray import tune

    search = {"architectures": ["topk", "standard"], "expansion_factors": [2, 4], "k": [16],
              "l1_coefficient": [5.0]}
    if tune_options["search_alg"] == "optuna":
        search.update({"expansion_factors": {"choice": [2, 4]}, "k": {"choice": [16, 32]},
                       "l1_coefficient": {"loguniform": [1.0, 10.0]}, "num_samples": 2})
    data = copy.deepcopy(BASE)
    data["hookpoints"] = data["hookpoints"][:1]
    data["search"] = search
    data["tune"] = {**tune_options, "resources_per_trial": {"cpu": 0.5}}
    exp = parse_experiment(data, check_model=False)

    # Defined here so that Ray pickles it by value: workers cannot import test modules.
    def report_trainable(config):
        # Explained variance that grows with tokens, faster for larger SAEs.
        for step in range(1, 5):
            tokens = step * 16384
            explained = 1 - math.exp(-tokens * config["expansion_factor"] / 200_000)
            tune.report({TOKENS_TRAINED: tokens, "explained_variance": explained, "l0": 10.0})

    tuner = tune.Tuner(
        tune.with_resources(report_trainable, exp.tune.resources_per_trial.to_ray()),
        param_space=build_param_space(exp),
        tune_config=build_tune_config(exp),
        run_config=tune.RunConfig(name="space", storage_path=str(tmp_path), verbose=0),
    )
    results = tuner.fit()

    assert results.num_errors == 0
    assert len(results) == count_trials(exp) == 4
    for result in results:
        config = result.config
        assert config["hookpoint"] == "blocks.1.hook_resid_pre"
        assert config["architecture"] in ("topk", "standard")
        assert (config["k"] is None) == (config["architecture"] != "topk")
        assert (config["l1_coefficient"] is None) == (config["architecture"] != "standard")
        assert result.metrics[TOKENS_TRAINED] >= 16384
    best = results.get_best_result()
    assert best.metrics["explained_variance"] == max(
        result.metrics["explained_variance"] for result in results
    )


@pytest.mark.parametrize("saes_per_trial", [2, 5, 100])
def test_packs_hold_every_grid_config_once(saes_per_trial):
    exp = experiment({"tune": {"saes_per_trial": saes_per_trial}})
    trials = expand(exp)
    assert len(trials) == count_tune_trials(exp)

    members = [member for trial in trials for member in trial_members(trial)]
    keys = [key(member) for member in members]
    assert len(keys) == len(set(keys)) == count_trials(exp) == 24
    assert set(keys) == {key(config) for config in expand(experiment())}
    for trial in trials:
        pack = trial[PACK_KEY]["members"]
        assert trial["hookpoint"] == trial[PACK_KEY]["hookpoint"]
        assert {member["hookpoint"] for member in pack} == {trial["hookpoint"]}
        assert 1 <= len(pack) <= saes_per_trial
    # 12 configs per hookpoint: the fewest packs, of sizes that differ by at most one.
    sizes = sorted(len(trial_members(trial)) for trial in trials)
    assert sizes[-1] - sizes[0] <= 1
    assert len(trials) == 2 * -(-12 // saes_per_trial)


def test_random_packs_seeded_and_resampled():
    changes = {
        "tune": {"search_alg": "random", "saes_per_trial": 4, "seed": 7},
        "search": {"num_samples": 3, "l1_coefficient": {"loguniform": [0.1, 10.0]}, "k": [16]},
    }
    exp = experiment(changes)
    packs = build_packs(exp)
    members = [member for pack in packs for member in pack["members"]]
    # Per hookpoint and sample: 2 expansion factors x (1 k + 1 l1 draw + 1 l0) = 6 configs.
    assert len(members) == count_trials(exp) == 3 * 2 * 6
    l1_values = {member["l1_coefficient"] for member in members if member["architecture"] == "standard"}
    assert len(l1_values) == 3 * 2 * 2
    assert all(0.1 <= value <= 10.0 for value in l1_values)
    assert build_packs(experiment(changes)) == packs
    changes["tune"]["seed"] = 8
    assert build_packs(experiment(changes)) != packs
