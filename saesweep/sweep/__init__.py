"""The sweep: the Ray Tune search space, search algorithm and scheduler of an experiment."""

from saesweep.sweep.space import (
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

__all__ = [
    "TOKENS_TRAINED",
    "build_packs",
    "build_param_space",
    "build_scheduler",
    "build_search_alg",
    "build_tune_config",
    "count_trials",
    "count_tune_trials",
    "num_samples",
    "trial_sae_config",
]
