"""Checks of the `search` section: architectures, search values and their ranges."""

from __future__ import annotations

import dataclasses
import difflib
import logging
from typing import TYPE_CHECKING, Any

from saesweep.experiment.errors import MISSING, ErrorCollector, suggest
from saesweep.experiment.search import architectures_using, coefficient_names
from saesweep.experiment.search_values import CHOICE, GRID
from saesweep.saes import SAEConfig, get_architecture, list_architectures

if TYPE_CHECKING:
    from saesweep.activations.models import ModelInfo
    from saesweep.experiment.config import ExperimentConfig

logger = logging.getLogger(__name__)


def check_search(exp: ExperimentConfig, errors: ErrorCollector, info: ModelInfo | None) -> None:
    """Record the problems of the search section. `info` enables the k <= d_sae check."""
    search = exp.search
    algorithm = exp.tune.search_alg
    _check_architectures(search, errors)
    chosen = [a for a in search.architectures if a in list_architectures()]
    used = {get_architecture(a).sparsity_coefficient for a in chosen}

    for name in coefficient_names():
        if name in used and getattr(search, name) is None:
            users = [a for a in chosen if get_architecture(a).sparsity_coefficient == name]
            example = next(f.default for f in dataclasses.fields(SAEConfig) if f.name == name)
            errors.add(
                f"search.{name}", MISSING, f"the architectures {users} need it",
                f"add e.g. `{name}: [{example}]`.",
            )
        elif name not in used and getattr(search, name) is not None:
            logger.warning(
                "search.%s is ignored: no architecture in search.architectures uses it (%s do)",
                name, ", ".join(architectures_using(name)),
            )

    searched = {"search.expansion_factors": search.expansion_factors}
    for name in sorted(used):
        if getattr(search, name) is not None:
            searched[f"search.{name}"] = getattr(search, name)
    for path, value in searched.items():
        _check_kind(path, value, algorithm, errors)
        _check_range(path, value, exp, errors, info)

    if search.num_samples < 1:
        errors.add("search.num_samples", search.num_samples, "must be at least 1", "use 1 or more.")
    elif algorithm == "grid" and search.num_samples != 1:
        errors.add(
            "search.num_samples", search.num_samples,
            "grid search runs each grid point once",
            "remove num_samples, or set tune.search_alg: random.",
            related=("tune.search_alg",),
        )


def _check_architectures(search: Any, errors: ErrorCollector) -> None:
    known = list_architectures()
    if not search.architectures:
        errors.add("search.architectures", [], "the list is empty", f"list some of {known}.")
    for index, architecture in enumerate(search.architectures):
        path = f"search.architectures[{index}]"
        if architecture not in known:
            close = difflib.get_close_matches(architecture, known, n=1)
            errors.add(
                path, architecture, "is not a registered SAE architecture",
                suggest(close[0] if close else None, f"use one of {known}."),
            )
        elif search.architectures.index(architecture) != index:
            errors.add(path, architecture, "is listed twice", "remove the duplicate.")


def _check_kind(path: str, value: Any, algorithm: str, errors: ErrorCollector) -> None:
    if algorithm == "grid" and value.kind != GRID:
        errors.add(
            path, value.to_yaml(), f"grid search cannot sample from {{{value.kind}: ...}}",
            f"list the values to try, e.g. {_example_grid(value)}, or set tune.search_alg: random.",
            related=("tune.search_alg",),
        )
    elif algorithm == "optuna" and value.kind == GRID and len(value.values) > 1:
        errors.add(
            path, value.to_yaml(), "optuna samples its values and cannot enumerate a grid list",
            f"write {{{CHOICE}: {list(value.values)}}}, or set tune.search_alg: grid.",
            related=("tune.search_alg",),
        )


def _example_grid(value: Any) -> list:
    if value.kind == GRID or value.kind == CHOICE:
        return list(value.values)
    low, high = value.values
    return [low, value.representative(), high]


def _check_range(
    path: str, value: Any, exp: ExperimentConfig, errors: ErrorCollector, info: ModelInfo | None
) -> None:
    if path == "search.expansion_factors":
        if value.lowest < 1:
            errors.add(
                path, value.to_yaml(), "expansion factors must be at least 1",
                "use values such as [8, 16].",
            )
        return
    if value.element_type is not int:
        if value.lowest < 0:
            errors.add(
                path, value.to_yaml(), "a sparsity coefficient cannot be negative",
                "use positive values.",
            )
        return
    # Integer coefficients (k) count active latents, so they lie in [1, d_sae].
    if value.lowest < 1:
        errors.add(path, value.to_yaml(), "must be at least 1", "use values such as [32, 64].")
        return
    if info is None or errors.is_invalid("search.expansion_factors"):
        return
    smallest_factor = int(exp.search.expansion_factors.lowest)
    d_sae = smallest_factor * info.d_model
    if value.highest > d_sae:
        errors.add(
            path, value.to_yaml(),
            f"{int(value.highest)} exceeds d_sae = {d_sae} of the smallest expansion factor "
            f"{smallest_factor} (d_model {info.d_model})",
            f"use values up to {d_sae}, or raise the smallest expansion factor.",
        )
