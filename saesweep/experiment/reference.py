"""Reference of every experiment field: YAML path, type, default and documentation."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from saesweep.experiment.config import ExperimentConfig, section_type
from saesweep.experiment.convert import field_docs, type_name


@dataclass(frozen=True)
class FieldDoc:
    """Documentation of one experiment field."""

    path: str
    """Dotted YAML path, e.g. training.lr."""
    type: str
    """Accepted YAML values, in words."""
    default: Any
    """Default value, or dataclasses.MISSING for a required field."""
    help: str
    """The field's docstring."""
    is_section: bool = False
    """Whether the field is a mapping whose keys are listed after it."""


def field_reference(cls: type = ExperimentConfig, prefix: str = "") -> list[FieldDoc]:
    """Return the documentation of every field of `cls` and of its sections, depth first."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    reference = []
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        path = f"{prefix}{field.name}"
        hint = hints[field.name]
        section = section_type(hint)
        if field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = field.default
        help = docs.get(field.name, "")
        if section is not None:
            reference.append(FieldDoc(path, type_name(hint), default, help, is_section=True))
            reference.extend(field_reference(section, f"{path}."))
        else:
            reference.append(FieldDoc(path, type_name(hint), default, help))
    return reference


def format_reference() -> str:
    """Return the field reference as plain text, one paragraph per field."""
    paragraphs = []
    for doc in field_reference():
        if doc.default is dataclasses.MISSING:
            default = "required"
        elif doc.is_section:
            default = "optional"
        elif doc.default is None:
            default = "default null"
        else:
            default = f"default {_plain(doc.default)!r}"
        paragraphs.append(f"{doc.path} ({doc.type}; {default})\n    {doc.help}")
    return "\n".join(paragraphs)


def _plain(value: Any) -> Any:
    if hasattr(value, "to_yaml"):
        return value.to_yaml()
    if isinstance(value, tuple):
        return list(value)
    return value
