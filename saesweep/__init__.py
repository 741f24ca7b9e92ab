"""saesweep: train and compare many sparse autoencoders on language-model activations."""

from saesweep.saes import SAE, SAEConfig

__all__ = ["SAE", "SAEConfig"]
__version__ = "0.1.0"
