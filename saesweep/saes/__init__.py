"""The SAE library: one module per architecture behind `SAE` and a registry."""

from saesweep.saes.base import SAE, TrainingOutput
from saesweep.saes.config import SAEConfig
from saesweep.saes.registry import get_architecture, list_architectures, register_architecture

__all__ = [
    "SAE",
    "SAEConfig",
    "TrainingOutput",
    "get_architecture",
    "list_architectures",
    "register_architecture",
]
