"""Typed conversion of parsed YAML into the experiment dataclasses.

Each dataclass field is converted by its type annotation. Problems are recorded
in an `ErrorCollector` with the field's YAML path and documentation, and the
field keeps its default so that the rest of the file is still checked.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import textwrap
import types
import typing
from typing import Any, Literal, Union

from saesweep.experiment.errors import MISSING, ErrorCollector, suggest

INVALID = object()
"""Returned by a converter when the value cannot be converted, after it recorded the error."""


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Return the attribute docstrings of the dataclass `cls` and its bases, by field name.

    A class may set `__field_docs_from__` to another class whose docstrings
    document its fields. The `sae` and `search` sections use it to reuse the
    documentation of `SAEConfig`.
    """
    docs: dict[str, str] = {}
    source_classes = [getattr(cls, "__field_docs_from__", cls)]
    source_classes += [base for base in cls.__mro__[1:] if dataclasses.is_dataclass(base)]
    for source_class in reversed(source_classes):
        docs.update(_attribute_docstrings(source_class))
    return docs


def _attribute_docstrings(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    class_node = ast.parse(source).body[0]
    docs = {}
    body = getattr(class_node, "body", [])
    for statement, following in zip(body, body[1:]):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[statement.target.id] = " ".join(following.value.value.split())
    return docs


_PLURALS = {
    "an integer": "integers",
    "a number": "numbers",
    "a string": "strings",
    "true or false": "booleans",
}


def type_name(hint: Any) -> str:
    """Return a short, YAML-oriented name of a type annotation for messages."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return "any value"
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin in (Union, types.UnionType):
        names = [type_name(arg) for arg in args if arg is not type(None)]
        text = " or ".join(names)
        return text + " or null" if type(None) in args else text
    if origin in (list, tuple):
        if not args:
            return "a list"
        item = type_name(args[0])
        return f"a list of {_PLURALS[item]}" if item in _PLURALS else f"a list, each {item}"
    if origin is dict:
        return f"a mapping of names to {type_name(args[1])}" if args else "a mapping"
    if hasattr(hint, "yaml_type_name"):
        return hint.yaml_type_name
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def convert(value: Any, hint: Any, path: str, errors: ErrorCollector, help: str = "") -> Any:
    """Convert `value` to the type `hint`, or record an error at `path` and return INVALID."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)

    if hint is Any:
        return value
    if hasattr(hint, "from_yaml"):
        return hint.from_yaml(value, path, errors, help)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, path, errors)
    if origin in (Union, types.UnionType):
        return _convert_union(value, hint, args, path, errors, help)
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(arg) for arg in args], n=1)
        errors.add(
            path, value, f"must be {type_name(hint)}",
            suggest(close[0] if close else None, f"set one of {list(args)}."), help=help,
        )
        return INVALID
    if origin in (list, tuple):
        return _convert_sequence(value, hint, origin, args, path, errors, help)
    if origin is dict:
        return _convert_mapping(value, args, path, errors, help)
    if hint in (bool, int, float, str):
        return _convert_scalar(value, hint, path, errors, help)
    raise TypeError(f"no converter for the annotation {hint!r} at {path}")


def build_dataclass(cls: type, value: Any, path: str, errors: ErrorCollector) -> Any:
    """Build the dataclass `cls` from the mapping `value`, checking every key."""
    docs = field_docs(cls)
    if value is None:
        value = {}
    if not isinstance(value, dict):
        errors.add(
            path or "(top level)",
            value,
            f"must be a mapping with keys such as {_field_names(cls)[:4]}",
            "write it as `key: value` lines, indented under the section name.",
        )
        value = {}

    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    hints = typing.get_type_hints(cls)
    for key in value:
        if key not in fields:
            _report_unknown_key(key, value[key], list(fields), path, errors)

    kwargs = {}
    for name, field in fields.items():
        field_path = f"{path}.{name}" if path else name
        has_default = (
            field.default is not dataclasses.MISSING
            or field.default_factory is not dataclasses.MISSING
        )
        if name not in value:
            if not has_default:
                errors.add(
                    field_path, MISSING, "this key is required",
                    f"add `{name}:` with {type_name(hints[name])}.", help=docs.get(name, ""),
                )
                # The object is incomplete, so checks that read it must skip it.
                errors.mark_invalid(path)
                kwargs[name] = None
            continue
        converted = convert(value[name], hints[name], field_path, errors, docs.get(name, ""))
        if converted is INVALID:
            errors.mark_invalid(field_path)
            kwargs[name] = None if not has_default else _default_of(field)
        else:
            kwargs[name] = converted
    return cls(**kwargs)


def _field_names(cls: type) -> list[str]:
    return [field.name for field in dataclasses.fields(cls) if field.init]


def _default_of(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _report_unknown_key(
    key: Any, value: Any, valid: list[str], path: str, errors: ErrorCollector
) -> None:
    key_path = f"{path}.{key}" if path else str(key)
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
    errors.add(
        key_path,
        value,
        f"unknown key {key!r}",
        suggest(
            close[0] if close else None,
            f"valid keys{' in ' + path if path else ''}: {', '.join(valid)}.",
            quote="`",
        ),
    )


def _convert_union(
    value: Any, hint: Any, args: tuple, path: str, errors: ErrorCollector, help: str
) -> Any:
    non_null = [arg for arg in args if arg is not type(None)]
    if value is None:
        if type(None) in args:
            return None
        errors.add(path, value, f"must be {type_name(hint)}, not null", "set a value.", help=help)
        return INVALID
    if len(non_null) == 1:
        return convert(value, non_null[0], path, errors, help)
    # Several alternatives: take the first that converts without errors.
    for arg in non_null:
        trial = ErrorCollector(errors.source)
        converted = convert(value, arg, path, trial, help)
        if converted is not INVALID and not trial.errors:
            return converted
    errors.add(
        path, value, f"must be {type_name(hint)}", f"write {type_name(hint)}.", help=help
    )
    return INVALID


def _convert_sequence(
    value: Any,
    hint: Any,
    origin: type,
    args: tuple,
    path: str,
    errors: ErrorCollector,
    help: str,
) -> Any:
    if not isinstance(value, list):
        errors.add(
            path, value, f"must be {type_name(hint)}", "write a YAML list such as `[a, b]`.",
            help=help,
        )
        return INVALID
    if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(value):
        errors.add(
            path, value, f"must be a list of exactly {len(args)} values",
            f"write {len(args)} values, e.g. `[{', '.join(type_name(a) for a in args)}]`.",
            help=help,
        )
        return INVALID
    converted = []
    for index, item in enumerate(value):
        item_hint = args[0] if origin is list or args[-1] is Ellipsis else args[index]
        item_value = convert(item, item_hint, f"{path}[{index}]", errors, help)
        if item_value is INVALID:
            return INVALID
        converted.append(item_value)
    return tuple(converted) if origin is tuple else converted


def _convert_mapping(
    value: Any, args: tuple, path: str, errors: ErrorCollector, help: str
) -> Any:
    if not isinstance(value, dict):
        errors.add(
            path, value, "must be a mapping", "write `key: value` lines under the key.", help=help
        )
        return INVALID
    value_hint = args[1] if args else Any
    converted = {}
    for key, item in value.items():
        if not isinstance(key, str):
            errors.add(
                f"{path}.{key}", item, f"the key {key!r} must be a string",
                "quote the key in the YAML file.", help=help,
            )
            return INVALID
        item_value = convert(item, value_hint, f"{path}.{key}", errors, help)
        if item_value is INVALID:
            return INVALID
        converted[key] = item_value
    return converted


def _convert_scalar(
    value: Any, hint: type, path: str, errors: ErrorCollector, help: str
) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
        errors.add(path, value, "must be true or false", "write true or false.", help=help)
        return INVALID
    if hint is str:
        if isinstance(value, str):
            return value
        errors.add(
            path, value, "must be a string", f"write a string, e.g. {str(value)!r} in quotes.",
            help=help,
        )
        return INVALID

    number = parse_number(value)
    if number is None:
        errors.add(
            path, value, f"must be {type_name(hint)}",
            f"write {type_name(hint)} such as {'4096' if hint is int else '0.001'}.", help=help,
        )
        return INVALID
    if hint is float:
        return float(number)
    if isinstance(number, float) and not number.is_integer():
        errors.add(
            path, value, "must be an integer", f"write a whole number such as {round(number)}.",
            help=help,
        )
        return INVALID
    return int(number)


def parse_number(value: Any) -> int | float | None:
    """Return `value` as a finite number, or None when it is not one.

    PyYAML reads `1e-3` (no dot in the mantissa) as a string, so numeric
    strings are accepted as numbers. Booleans are not numbers here.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            number = float(value.replace("_", ""))
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None
