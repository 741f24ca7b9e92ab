"""SAE training: metrics and the trainer loop over a plain iterator of activations."""
