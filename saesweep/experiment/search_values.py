"""Search values: the set of values one hyperparameter takes in a sweep."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from saesweep.experiment.convert import INVALID, parse_number
from saesweep.experiment.errors import ErrorCollector, suggest

GRID = "grid"
CHOICE = "choice"
LOGUNIFORM = "loguniform"
KINDS = (GRID, CHOICE, LOGUNIFORM)


@dataclass(frozen=True)
class SearchValue:
    """A grid of values, a choice among values, or a log-uniform range.

    YAML forms: a value or a list (`[8, 16]`, a grid: every value is tried),
    `{choice: [8, 16]}` (each trial samples one), and `{loguniform: [1e-4, 1e-2]}`
    (each trial samples from the range, bounds included).
    """

    kind: str
    """"grid", "choice" or "loguniform"."""
    values: tuple
    """The grid or choice values, or (low, high) for loguniform."""

    element_type: ClassVar[type] = float
    yaml_type_name: ClassVar[str] = (
        "a value, a list of values, {choice: [...]} or {loguniform: [low, high]}"
    )
    mapping_form: ClassVar[None] = None
    """None: the dataclass fields are not YAML keys, so field references stop here."""

    @classmethod
    def from_yaml(cls, value: Any, path: str, errors: ErrorCollector, help: str = "") -> Any:
        """Parse one of the YAML forms, or record an error at `path` and return INVALID."""
        if isinstance(value, dict):
            return cls._from_mapping(value, path, errors, help)
        items = value if isinstance(value, list) else [value]
        if not items:
            errors.add(
                path, value, "the list of values is empty",
                "list at least one value, e.g. [1e-3, 1e-2].", help=help,
            )
            return INVALID
        numbers = cls._parse_items(items, path, errors, help, indexed=isinstance(value, list))
        return INVALID if numbers is None else cls(GRID, tuple(numbers))

    @classmethod
    def _from_mapping(
        cls, value: dict, path: str, errors: ErrorCollector, help: str
    ) -> Any:
        if len(value) != 1 or next(iter(value)) not in KINDS:
            key = next(iter(value), None)
            close = difflib.get_close_matches(str(key), KINDS, n=1)
            errors.add(
                path, value, "a search mapping must have exactly one key: choice or loguniform",
                suggest(
                    close[0] if close and len(value) == 1 else None,
                    "write a list for a grid, `{choice: [a, b]}` or `{loguniform: [low, high]}`.",
                    quote="`",
                ),
                help=help,
            )
            return INVALID
        kind, items = next(iter(value.items()))
        if not isinstance(items, list) or not items:
            errors.add(
                f"{path}.{kind}", items, "must be a non-empty list",
                f"write e.g. `{{{kind}: [1e-4, 1e-2]}}`.", help=help,
            )
            return INVALID
        numbers = cls._parse_items(items, f"{path}.{kind}", errors, help)
        if numbers is None:
            return INVALID
        if kind == LOGUNIFORM:
            if len(numbers) != 2:
                errors.add(
                    f"{path}.{kind}", items, "a log-uniform range needs exactly [low, high]",
                    "write two numbers, e.g. `{loguniform: [1e-4, 1e-2]}`.", help=help,
                )
                return INVALID
            low, high = numbers
            if not 0 < low < high:
                errors.add(
                    f"{path}.{kind}", items, "a log-uniform range needs 0 < low < high",
                    "use two positive bounds in increasing order, e.g. [1e-4, 1e-2].", help=help,
                )
                return INVALID
        return cls(kind, tuple(numbers))

    @classmethod
    def _parse_items(
        cls, items: list, path: str, errors: ErrorCollector, help: str, indexed: bool = True
    ) -> list | None:
        numbers = []
        for index, item in enumerate(items):
            number = parse_number(item)
            item_path = f"{path}[{index}]" if indexed else path
            if number is None:
                errors.add(
                    item_path, item, f"must be {cls._element_name()}",
                    f"write {cls._element_name()}, e.g. {cls._example()}.", help=help,
                )
                return None
            if cls.element_type is int:
                if not float(number).is_integer():
                    errors.add(
                        item_path, item, "must be an integer",
                        f"write a whole number such as {round(number)}.", help=help,
                    )
                    return None
                number = int(number)
            else:
                number = float(number)
            numbers.append(number)
        return numbers

    @classmethod
    def _element_name(cls) -> str:
        return "an integer" if cls.element_type is int else "a number"

    @classmethod
    def _example(cls) -> str:
        return "32" if cls.element_type is int else "0.001"

    @property
    def is_grid(self) -> bool:
        return self.kind == GRID

    @property
    def lowest(self) -> float:
        """Smallest value the search can take."""
        return min(self.values)

    @property
    def highest(self) -> float:
        """Largest value the search can take."""
        return max(self.values)

    def representative(self) -> int | float:
        """Return one typical value: the first listed, or the geometric mean of a range."""
        if self.kind != LOGUNIFORM:
            return self.values[0]
        middle = math.sqrt(self.values[0] * self.values[1])
        return round(middle) if self.element_type is int else middle

    def to_yaml(self) -> Any:
        """Return the YAML form that `from_yaml` reads back to an equal value."""
        if self.kind == GRID:
            return list(self.values)
        return {self.kind: list(self.values)}


@dataclass(frozen=True)
class IntSearchValue(SearchValue):
    """A search value over integers (expansion factors, k)."""

    element_type: ClassVar[type] = int


def search_value_type(element_type: type) -> type[SearchValue]:
    """Return the SearchValue class whose values have `element_type` (int or float)."""
    return IntSearchValue if element_type is int else SearchValue
