"""Registry of SAE architectures: the name in a config or cfg.json -> the class."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from saesweep.saes.base import SAE

_ARCHITECTURES: dict[str, type[SAE]] = {}


def register_architecture(cls: type[SAE]) -> type[SAE]:
    """Class decorator: make `cls` available under `cls.architecture`."""
    name = cls.architecture
    if name in _ARCHITECTURES and _ARCHITECTURES[name] is not cls:
        raise ValueError(f"architecture {name!r} is already registered")
    _ARCHITECTURES[name] = cls
    return cls


def _load_builtin_architectures() -> None:
    # Importing the modules runs their @register_architecture decorators.
    import saesweep.saes.standard  # noqa: F401
    import saesweep.saes.gated  # noqa: F401
    import saesweep.saes.jumprelu  # noqa: F401
    import saesweep.saes.topk  # noqa: F401
    import saesweep.saes.batchtopk  # noqa: F401


def get_architecture(name: str) -> type[SAE]:
    """Return the SAE class registered as `name`."""
    _load_builtin_architectures()
    if name not in _ARCHITECTURES:
        raise ValueError(
            f"unknown SAE architecture {name!r}: use one of {list_architectures()}"
        )
    return _ARCHITECTURES[name]


# Built-in architectures are listed in this order whatever order modules were
# imported in, so plots, tables and error messages do not depend on imports.
_BUILTIN_ORDER = ("standard", "gated", "jumprelu", "topk", "batchtopk")


def list_architectures() -> list[str]:
    """Return the names of every registered architecture: the built-in ones
    first in a fixed order, then others in registration order."""
    _load_builtin_architectures()
    builtin = [name for name in _BUILTIN_ORDER if name in _ARCHITECTURES]
    return builtin + [name for name in _ARCHITECTURES if name not in _BUILTIN_ORDER]
