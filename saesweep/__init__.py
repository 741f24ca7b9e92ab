"""saesweep: train and compare many sparse autoencoders on language-model activations."""

from typing import Any

from saesweep.saes import SAE, SAEConfig

__all__ = ["SAE", "SAEConfig", "SplicedModel"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # SplicedModel is imported on first use, so `import saesweep` stays free of TransformerLens.
    if name == "SplicedModel":
        from saesweep.evaluation.spliced_model import SplicedModel

        return SplicedModel
    raise AttributeError(f"module 'saesweep' has no attribute {name!r}")
