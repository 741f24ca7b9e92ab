"""Validation errors of an experiment file, collected so that one run reports all of them."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MISSING = object()
"""Marks a required key that the experiment file does not set."""


def format_value(value: Any, limit: int = 80) -> str:
    """Return `value` as a short Python literal for an error message."""
    if value is MISSING:
        return "(missing)"
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def suggest(close: str | None, fix: str, quote: str = "'") -> str:
    """Return `fix`, led by "did you mean <close>?" when a close match was found."""
    if not close:
        return fix
    return f"did you mean {quote}{close}{quote}? {fix[:1].upper()}{fix[1:]}"


@dataclass(frozen=True)
class FieldError:
    """One invalid value in an experiment, with where it is and how to fix it."""

    path: str
    """Dotted YAML path of the value, e.g. `search.k[1]` or `training.lr`."""
    value: Any
    """The value found there, or `MISSING`."""
    problem: str
    """Description of the problem with the value."""
    fix: str
    """Instruction that fixes the value."""
    help: str = ""
    """Documentation of the field, as declared in the schema."""

    def __str__(self) -> str:
        if self.value is MISSING:
            head = f"{self.path} is missing: {self.problem}."
        else:
            head = f"{self.path} = {format_value(self.value)}: {self.problem}."
        lines = [head, f"  Fix: {self.fix}"]
        if self.help:
            field_name = re.sub(r"(\[\d+\])+$", "", self.path.rsplit(".", 1)[-1])
            lines.append(f"  {field_name}: {self.help}")
        return "\n".join(lines)


class ExperimentError(ValueError):
    """An experiment file that cannot run. `errors` lists every problem found."""

    def __init__(self, errors: list[FieldError], source: str = "experiment"):
        self.errors = list(errors)
        self.source = source
        count = len(self.errors)
        noun = "error" if count == 1 else "errors"
        body = "\n".join(str(error) for error in self.errors)
        super().__init__(f"{source}: {count} {noun}\n{body}")

    @property
    def messages(self) -> list[str]:
        """One message per error, each naming the YAML path, the value and the fix."""
        return [str(error) for error in self.errors]


class ErrorCollector:
    """Accumulates `FieldError`s, at most one per path.

    A value that failed to parse is replaced by its default so that the other
    checks can still run. Those checks pass the paths they read as `related`, and
    their error is dropped when one of them is already invalid, which avoids a
    cascade of errors caused by one typo.
    """

    def __init__(
        self, source: str = "experiment", help_lookup: Callable[[str], str] | None = None
    ):
        self.source = source
        self.help_lookup = help_lookup
        """Lookup of a path's documentation, for errors added without `help`."""
        self.errors: list[FieldError] = []
        self._invalid: set[str] = set()
        self.overridden: set[str] = set()
        """Paths set by `--set` overrides, which their messages mention."""

    def add(
        self,
        path: str,
        value: Any,
        problem: str,
        fix: str,
        *,
        help: str = "",
        related: tuple[str, ...] = (),
    ) -> None:
        """Record that the value at `path` is invalid, unless a related path already is."""
        if self.is_invalid(path) or any(self.is_invalid(other) for other in related):
            return
        if not help and self.help_lookup is not None:
            help = self.help_lookup(path)
        for override in self.overridden:
            if _is_within(path, override):
                problem = f"{problem} (set by --set {override}=...)"
                break
        self.errors.append(FieldError(path, value, problem, fix, help))
        self._invalid.add(path)

    def mark_invalid(self, path: str) -> None:
        """Treat `path` as invalid because a value inside it already has an error."""
        self._invalid.add(path)

    def is_invalid(self, path: str) -> bool:
        """Return whether `path`, or a section or list that contains it, already has an error."""
        return any(_is_within(path, bad) for bad in self._invalid)

    def has_errors_under(self, path: str) -> bool:
        """Return whether `path` or any value inside it has an error."""
        return any(_is_within(bad, path) for bad in self._invalid)

    def raise_if_any(self) -> None:
        if self.errors:
            raise ExperimentError(self.errors, self.source)


def _is_within(path: str, container: str) -> bool:
    """Return whether the YAML `path` is `container` or a value inside it."""
    return (
        path == container
        or path.startswith(container + ".")
        or path.startswith(container + "[")
    )
