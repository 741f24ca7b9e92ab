"""Reading experiment files: YAML, `--set` overrides, conversion and validation."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from saesweep.experiment.config import ExperimentConfig, field_help
from saesweep.experiment.convert import build_dataclass
from saesweep.experiment.errors import ErrorCollector, ExperimentError, FieldError
from saesweep.experiment.validate import validate_experiment

logger = logging.getLogger(__name__)


def load_experiment(
    path: str | Path, overrides: Iterable[str] = (), *, check_model: bool = True
) -> ExperimentConfig:
    """Read, override and validate the experiment file at `path`.

    `overrides` are `key.path=value` strings as given to `--set`. Each value is
    parsed as YAML, so `--set search.k=[16,32]` sets a list. With `check_model`
    the model's config (not its weights) is read to check layers, hook names,
    the context size and k against d_sae.

    Raises ExperimentError listing every problem found, each with its YAML path,
    the value and the fix.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ExperimentError(
            [FieldError("(file)", source, f"cannot be read ({error.strerror})",
                        "check the path of the experiment file.")],
            source,
        ) from error
    data = parse_yaml(text, source)
    return parse_experiment(data, overrides, check_model=check_model, source=source)


def parse_experiment(
    data: Mapping[str, Any],
    overrides: Iterable[str] = (),
    *,
    check_model: bool = True,
    source: str = "experiment",
) -> ExperimentConfig:
    """Build and validate an experiment from already parsed YAML data (see load_experiment)."""
    errors = ErrorCollector(source, help_lookup=field_help)
    data = copy.deepcopy(dict(data))
    for override in overrides:
        apply_override(data, override, errors)
    exp = build_dataclass(ExperimentConfig, data, "", errors)
    if exp.mlflow.experiment_name is None and exp.name:
        exp.mlflow.experiment_name = exp.name
    validate_experiment(exp, errors, check_model=check_model)
    errors.raise_if_any()
    logger.debug("experiment %s is valid: %d hookpoints", exp.name, len(exp.hookpoint_names))
    return exp


def parse_yaml(text: str, source: str) -> dict[str, Any]:
    """Parse the YAML text of an experiment file, rejecting duplicate keys."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ExperimentError(
            [FieldError("(file)", source, f"is not valid YAML{where}: {problem}",
                        "correct the syntax there, and indent with spaces, not tabs.")],
            source,
        ) from error
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ExperimentError(
            [FieldError("(top level)", data, "must be a mapping of sections",
                        "start the file with `name: my-sweep` and sections such as hookpoints:.")],
            source,
        )
    duplicates = list(_duplicate_keys(root, ""))
    if duplicates:
        raise ExperimentError(
            [FieldError(path, value, f"the key appears twice (again at line {line})",
                        "keep one of them, because YAML would silently use the last.")
             for path, value, line in duplicates],
            source,
        )
    return data


def _duplicate_keys(node: yaml.Node | None, path: str) -> Iterable[tuple[str, Any, int]]:
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            child = f"{path}.{key}" if path else str(key)
            if key in seen:
                yield child, _scalar_or_kind(value_node), key_node.start_mark.line + 1
            seen.add(key)
            yield from _duplicate_keys(value_node, child)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from _duplicate_keys(item, f"{path}[{index}]")


def _scalar_or_kind(node: yaml.Node) -> Any:
    return node.value if isinstance(node, yaml.ScalarNode) else f"<{node.id}>"


def apply_override(data: dict[str, Any], override: str, errors: ErrorCollector) -> None:
    """Set `key.path=value` in the parsed YAML `data`, recording malformed overrides."""
    key_path, separator, text = override.partition("=")
    key_path = key_path.strip()
    if not separator or not key_path:
        errors.add(
            f"--set {override}", override, "must have the form key.path=value",
            "write e.g. --set training.lr=1e-3.",
        )
        return
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as error:
        errors.add(
            key_path, text, f"the --set value is not valid YAML ({error})",
            "quote the value, e.g. --set 'search.k=[16, 32]'.",
        )
        return
    keys = key_path.split(".")
    node: Any = data
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, dict):
            parent = ".".join(keys[: depth + 1])
            errors.add(
                key_path, value, f"{parent} is not a mapping in this file, so it has no keys",
                f"set the whole value instead, e.g. --set {parent}=[...].",
            )
            return
        node = child
    node[keys[-1]] = value
    errors.overridden.add(key_path)
