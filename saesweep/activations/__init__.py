"""Activation serving: language models, the token stream, and the Ray server that feeds SAE trainers."""

from saesweep.activations.documents import DocumentSource
from saesweep.activations.embedded import (
    EMBEDDED_CORPUS_NAME,
    EMBEDDED_MODEL_NAME,
    cache_dir,
    embedded_corpus_files,
    prepare_all,
    prepare_embedded_model,
)
from saesweep.activations.models import ModelInfo, load_model, model_info, run_hookpoints
from saesweep.activations.tokens import (
    TokenBatch,
    TokenPolicy,
    TokenStream,
    served_positions,
)

__all__ = [
    "DocumentSource",
    "EMBEDDED_CORPUS_NAME",
    "EMBEDDED_MODEL_NAME",
    "ModelInfo",
    "TokenBatch",
    "TokenPolicy",
    "TokenStream",
    "cache_dir",
    "embedded_corpus_files",
    "load_model",
    "model_info",
    "prepare_all",
    "prepare_embedded_model",
    "run_hookpoints",
    "served_positions",
]
