"""Experiment files: the YAML schema of a sweep, its loading and its validation.

`load_experiment(path, overrides)` reads a file into an `ExperimentConfig` or
raises `ExperimentError` listing every problem, each with its YAML path, the
value and the fix. Every field is documented where it is declared; the same
text appears in error messages.
"""

from saesweep.experiment.config import ExperimentConfig, field_help
from saesweep.experiment.errors import ExperimentError, FieldError
from saesweep.experiment.loader import load_experiment, parse_experiment
from saesweep.experiment.reference import FieldDoc, field_reference, format_reference
from saesweep.experiment.runtime import (
    AshaSection,
    ChampionSection,
    MLflowSection,
    Resources,
    ServersSection,
    TuneSection,
)
from saesweep.experiment.search import SAEDefaults, SearchSection, coefficient_names
from saesweep.experiment.search_values import IntSearchValue, SearchValue
from saesweep.experiment.sections import (
    DataSection,
    HookpointsSection,
    LayerRange,
    ModelSection,
    TrainingSection,
)

__all__ = [
    "AshaSection",
    "ChampionSection",
    "DataSection",
    "ExperimentConfig",
    "ExperimentError",
    "FieldDoc",
    "FieldError",
    "HookpointsSection",
    "IntSearchValue",
    "LayerRange",
    "MLflowSection",
    "ModelSection",
    "Resources",
    "SAEDefaults",
    "SearchSection",
    "SearchValue",
    "ServersSection",
    "TrainingSection",
    "TuneSection",
    "coefficient_names",
    "field_help",
    "field_reference",
    "format_reference",
    "load_experiment",
    "parse_experiment",
]
