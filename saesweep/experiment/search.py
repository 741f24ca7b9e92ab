"""The `sae` and `search` sections, built from the SAE library's config and registry.

Both sections take their fields from `saesweep.saes`: `sae` has every
`SAEConfig` field that is the same for all trials, and `search` has one field
per sparsity coefficient that a registered architecture declares
(`SAE.sparsity_coefficient`). A new architecture or config field therefore
appears in experiment files without changes here.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from saesweep.experiment.search_values import (
    GRID,
    IntSearchValue,
    SearchValue,
    search_value_type,
)
from saesweep.saes import SAEConfig, get_architecture, list_architectures
from saesweep.saes.config import METADATA_FIELDS

# SAEConfig fields that are not SAE defaults: each trial sets them from its
# search point, from the model and hookpoint, or from training.seed.
_PER_TRIAL_FIELDS = {"architecture", "d_in", "d_sae", "seed", "metadata", *METADATA_FIELDS}


def coefficient_names() -> list[str]:
    """Sparsity coefficient field names of the registered architectures, in registry order."""
    names: list[str] = []
    for architecture in list_architectures():
        name = get_architecture(architecture).sparsity_coefficient
        if name not in names:
            names.append(name)
    return names


def architectures_using(coefficient: str) -> list[str]:
    """Registered architectures whose sparsity is set by `coefficient`."""
    return [
        architecture
        for architecture in list_architectures()
        if get_architecture(architecture).sparsity_coefficient == coefficient
    ]


def _make_sae_defaults() -> type:
    excluded = _PER_TRIAL_FIELDS | set(coefficient_names())
    hints = typing.get_type_hints(SAEConfig)
    fields = []
    for config_field in dataclasses.fields(SAEConfig):
        if config_field.name in excluded:
            continue
        if config_field.default_factory is not dataclasses.MISSING:
            spec = field(default_factory=config_field.default_factory)
        else:
            spec = field(default=config_field.default)
        fields.append((config_field.name, hints[config_field.name], spec))
    cls = dataclasses.make_dataclass(
        "SAEDefaults",
        fields,
        namespace={
            "__doc__": "SAE settings shared by every trial. Each field is an SAEConfig field.",
            "__field_docs_from__": SAEConfig,
            "__module__": __name__,
        },
    )
    return cls


SAEDefaults = _make_sae_defaults()


@dataclass
class _SearchFields:
    """The search space of every hookpoint: architectures, expansion factors and,
    per architecture, its sparsity coefficient (one field per coefficient).

    Each searched field takes a value or a list (a grid: every value is tried),
    `{choice: [...]}` or `{loguniform: [low, high]}` (sampled, for the random and
    optuna search algorithms).
    """

    architectures: list[str] = field(default_factory=lambda: ["topk"])
    """SAE architectures to train; each hookpoint gets every one of them, except
    that optuna chooses one per trial."""
    expansion_factors: IntSearchValue = field(
        default_factory=lambda: IntSearchValue(GRID, (8,))
    )
    """d_sae divided by the model's d_model."""
    num_samples: int = 1
    """Trials per hookpoint and architecture for the random and optuna search
    algorithms. Random search samples this many trials for every point of the
    grid lists as well. Grid search runs each grid point once and needs 1."""


def _make_search_section() -> type:
    hints = typing.get_type_hints(SAEConfig)
    fields = []
    for name in coefficient_names():
        value_type = search_value_type(hints[name])
        fields.append((name, value_type | None, field(default=None)))
    return dataclasses.make_dataclass(
        "SearchSection",
        fields,
        bases=(_SearchFields,),
        namespace={
            "__doc__": _SearchFields.__doc__,
            "__field_docs_from__": SAEConfig,
            "__module__": __name__,
        },
    )


SearchSection = _make_search_section()


def coefficient_values(search: object) -> dict[str, SearchValue]:
    """Return the coefficient search values set in the `search` section, by coefficient name."""
    values = {}
    for name in coefficient_names():
        value = getattr(search, name, None)
        if value is not None:
            values[name] = value
    return values
