"""A fixed held-out evaluation set per hookpoint, served by a Ray actor.

Every trial of a sweep is scored on the same held-out tokens: the first
`eval_tokens` served positions of the held-out split, in stream order. The
actor computes each hookpoint's activations once and keeps them in the object
store, so trials read them without another forward pass.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from saesweep.activations.models import load_model, model_info, run_hookpoints
from saesweep.activations.server import ServerConfig, open_token_stream
from saesweep.activations.tokens import TokenBatch
from saesweep.evaluation.splice import merge_losses, spliced_losses, with_scores
from saesweep.saes import SAE

logger = logging.getLogger(__name__)


def heldout_token_batches(config: ServerConfig, tokenizer: Any, policy: Any, eval_tokens: int) -> list[TokenBatch]:
    """Return the first batches of the held-out stream that contain at least `eval_tokens` served positions."""
    batches: list[TokenBatch] = []
    served = 0
    for batch in open_token_stream(config, tokenizer, policy):
        batches.append(batch)
        served += int(batch.keep.sum())
        if served >= eval_tokens:
            break
    return batches


@torch.no_grad()
def heldout_activations(model: Any, batches: list[TokenBatch], hookpoint: str, eval_tokens: int, device: str) -> torch.Tensor:
    """Compute the [eval_tokens, d_in] float32 activations of `hookpoint` at the served positions of `batches`."""
    parts = []
    for batch in batches:
        acts = run_hookpoints(model, batch.tokens.to(device), [hookpoint])[hookpoint]
        parts.append(acts[batch.keep.to(acts.device)].float().cpu())
    return torch.cat(parts)[:eval_tokens]


class EvaluationServer:
    """Ray actor: the model, the held-out token batches, and cached activations."""

    def __init__(self, config: ServerConfig, eval_tokens: int, ce_eval_tokens: int = 0):
        if config.split != "heldout":
            raise ValueError(f"EvaluationServer needs a held-out ServerConfig, got split={config.split!r}")
        self.config = config
        self.eval_tokens = eval_tokens
        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        self.model, tokenizer = load_model(
            config.model,
            dtype=config.dtype,
            device=config.device,
            random_weights=config.random_weights,
            seed=config.model_seed,
            **config.load_options,
        )
        info = model_info(config.model, random_weights=config.random_weights, **config.load_options)
        self.batches = heldout_token_batches(config, tokenizer, info.token_policy(), max(eval_tokens, ce_eval_tokens, 1))
        self.ce_batches = _first_batches(self.batches, ce_eval_tokens)
        self._cache: dict[str, ray.ObjectRef] = {}
        # Requests run on a thread pool; forward passes with hooks on one model
        # must not overlap, since each registers and removes hooks on it.
        self._lock = threading.Lock()
        logger.info("evaluation server loaded %d held-out batches for %s", len(self.batches), ", ".join(config.hookpoints))

    def ready(self) -> bool:
        return True

    def activations(self, hookpoint: str) -> list[ray.ObjectRef]:
        """Return [ref] to the [eval_tokens, d_in] float32 array of `hookpoint`.

        The list makes Ray return the reference itself, so the array is stored once.
        """
        if hookpoint not in self.config.hookpoints:
            raise ValueError(f"hookpoint {hookpoint!r} is not evaluated here: use one of {list(self.config.hookpoints)}")
        with self._lock:
            if hookpoint not in self._cache:
                acts = heldout_activations(self.model, self.batches, hookpoint, self.eval_tokens, self.config.device)
                self._cache[hookpoint] = ray.put(acts.numpy())
                logger.info("held-out activations of %s: %d tokens", hookpoint, acts.shape[0])
            return [self._cache[hookpoint]]

    def spliced_scores(self, sae_files: dict[str, bytes]) -> dict[str, float]:
        """Splice the SAE saved as `sae_files` (file name -> bytes of its SAELens files)
        into the model and score it on the held-out CE evaluation tokens."""
        if not self.ce_batches:
            raise ValueError("this evaluation server was started with ce_eval_tokens=0")
        with tempfile.TemporaryDirectory() as folder:
            for filename, content in sae_files.items():
                (Path(folder) / filename).write_bytes(content)
            sae = SAE.load_from_disk(folder, device=self.config.device)
        if sae.cfg.hook_name not in self.config.hookpoints:
            raise ValueError(f"SAE hookpoint {sae.cfg.hook_name!r} is not evaluated here: use one of {list(self.config.hookpoints)}")
        device = self.config.device
        with self._lock:
            # The SAE replaces activations only at served positions, where SAEs are trained.
            per_batch = [
                spliced_losses(self.model, sae, batch.tokens.to(device), splice_mask=batch.keep.to(device))
                for batch in self.ce_batches
            ]
        scores = with_scores(merge_losses(per_batch))
        scores["ce_eval_tokens"] = float(sum(batch.tokens.numel() for batch in self.ce_batches))
        return scores


def _first_batches(batches: list[TokenBatch], n_tokens: int) -> list[TokenBatch]:
    """Return the first of `batches` that together contain at least `n_tokens` tokens."""
    chosen: list[TokenBatch] = []
    total = 0
    for batch in batches:
        if total >= n_tokens:
            break
        chosen.append(batch)
        total += batch.tokens.numel()
    return chosen


def start_evaluation_server(
    config: ServerConfig,
    eval_tokens: int,
    *,
    name: str,
    num_cpus: float,
    num_gpus: float,
    resources: dict[str, float],
    max_restarts: int,
    ce_eval_tokens: int = 0,
) -> ray.actor.ActorHandle:
    actor_class = ray.remote(EvaluationServer)
    return actor_class.options(
        name=name,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        resources=resources,
        max_restarts=max_restarts,
        max_task_retries=-1,
        max_concurrency=4,
    ).remote(config, eval_tokens, ce_eval_tokens)


def sae_file_bytes(sae: SAE) -> dict[str, bytes]:
    """Return the SAELens files of `sae` (normalization folded in) as file name -> bytes."""
    with tempfile.TemporaryDirectory() as folder:
        sae.save_model(folder)
        return {path.name: path.read_bytes() for path in Path(folder).iterdir()}


def fetch_heldout(handle: ray.actor.ActorHandle, hookpoint: str) -> torch.Tensor:
    """Fetch the held-out activations of `hookpoint` as a read-only [eval_tokens, d_in] tensor, without a copy."""
    (ref,) = ray.get(handle.activations.remote(hookpoint))
    array: np.ndarray = ray.get(ref)
    with warnings.catch_warnings():
        # The array lives read-only in the object store; evaluation never writes to it.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)
