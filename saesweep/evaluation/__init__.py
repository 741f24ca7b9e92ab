"""Evaluation of trained SAEs on held-out text, where the language model lives."""
