"""The activation server: a Ray actor that runs the language model once for every subscriber.

The server hosts the model and the token stream. A producer thread runs one forward pass per
batch of token windows, capturing every hookpoint that currently has a subscriber and stopping
after the deepest of them. For each hookpoint it keeps only the served positions (see
``served_positions``), ``ray.put``s the ``[n_tokens, d_in]`` array once, and hands the object
reference to every subscriber of that hookpoint, so one node stores each batch once however
many trainers read it. :mod:`saesweep.activations.fanout` bounds how many batches are held and
blocks the producer while the slowest subscriber is that far behind.

Request methods (subscribe, poll, stats) run on the actor's thread pool, so a producer blocked
by backpressure or busy with a forward pass never stops subscribers from fetching.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch

from saesweep.activations.fanout import FanOut, HeldBatch
from saesweep.activations.models import DTYPES, load_model, model_info, run_hookpoints
from saesweep.activations.tokens import TokenBatch, TokenPolicy, TokenStream

logger = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    """Settings of one activation server: its model, token stream and hookpoints."""

    hookpoints: tuple[str, ...]
    """Hookpoints that subscribers may request, such as ``blocks.3.hook_resid_post``."""
    model: str = "smollm2-135m"
    """``"smollm2-135m"`` (embedded), a Hugging Face Hub name, or a local model folder."""
    dtype: str = "float32"
    """Model dtype, ``float32`` or ``bfloat16``. Activations are served in this dtype."""
    device: str = "cpu"
    """Torch device of the model, e.g. ``cpu`` or ``cuda``."""
    random_weights: bool = False
    """Build the model with seeded random weights (with ``gpt2``: the offline stand-in)."""
    model_seed: int = 0
    """Seed of the random weights when ``random_weights`` is set."""
    load_options: dict[str, Any] = field(default_factory=dict, repr=False)
    """Extra ``from_pretrained`` options (``revision``, ``token``, ...), never logged."""
    dataset: str | list[str] = "embedded"
    """``"embedded"``, local .txt/.jsonl/.parquet files or folders, or a Hub dataset name."""
    text_column: str = "text"
    """Column that contains the text in JSONL, Parquet and Hub datasets."""
    split: str = "train"
    """Document split to serve, ``train`` or ``heldout``."""
    prepend_bos: bool | None = None
    """Whether each window starts with BOS; None keeps the model's policy (see ``ModelInfo``)."""
    context_size: int = 128
    """Tokens per window."""
    seed: int = 0
    """Seed of the document order and the window shuffle."""
    sequences_per_batch: int = 8
    """Windows per forward pass, so a batch contains about ``sequences_per_batch * context_size`` tokens."""
    shuffle_windows: int = 1024
    """Size of the token stream's window shuffle buffer, in windows."""
    max_batches_in_flight: int = 4
    """Maximum batches held per hookpoint. The producer waits when the slowest subscriber is this far behind."""
    norm_estimate_tokens: int = 8192
    """Served tokens used to estimate each hookpoint's normalization scale."""
    norm_estimate_keep_bytes: int = 1 << 30
    """Largest size of the estimate's activations that the server keeps to serve as the
    stream's first batches instead of running them forward again. Batches beyond it
    run forward again when served."""
    subscriber_timeout_s: float = 600.0
    """A subscriber that has not polled for this many seconds is removed so it cannot stall the stream."""
    torch_threads: int | None = None
    """Torch CPU threads of the forward pass. None uses the number of CPUs Ray assigned to the actor."""

    def __post_init__(self) -> None:
        self.hookpoints = tuple(self.hookpoints)
        if not self.hookpoints:
            raise ValueError(
                "ServerConfig.hookpoints is empty. List the hookpoints to serve, for example "
                "('blocks.3.hook_resid_post',)."
            )
        if self.dtype not in DTYPES:
            raise ValueError(
                f"ServerConfig.dtype={self.dtype!r} is invalid. Use one of: {', '.join(DTYPES)}."
            )
        for name in ("context_size", "sequences_per_batch", "shuffle_windows",
                     "max_batches_in_flight", "norm_estimate_tokens"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"ServerConfig.{name}={value} is invalid. Set it to 1 or more.")
        if self.norm_estimate_keep_bytes < 0:
            raise ValueError(
                f"ServerConfig.norm_estimate_keep_bytes={self.norm_estimate_keep_bytes} is invalid. "
                "Set it to 0 to run every batch forward when served, or to a number of bytes."
            )
        if self.subscriber_timeout_s <= 0:
            raise ValueError(
                f"ServerConfig.subscriber_timeout_s={self.subscriber_timeout_s} is invalid. "
                "Set it to a positive number of seconds."
            )


def open_token_stream(config: ServerConfig, tokenizer, policy: TokenPolicy) -> TokenStream:
    """Return the endless token stream that a server with ``config`` serves, batch by batch.

    Batch ``n`` of this stream is the batch with sequence number ``n`` on the server, so a
    test or an evaluation can recompute what the server served. ``config.prepend_bos``, when
    set, overrides the model's ``policy``.
    """
    if config.prepend_bos is not None:
        policy = dataclasses.replace(policy, prepend_bos=config.prepend_bos)
    return TokenStream(
        config.dataset,
        tokenizer,
        policy,
        context_size=config.context_size,
        batch_size=config.sequences_per_batch,
        seed=config.seed,
        split=config.split,
        text_column=config.text_column,
        shuffle_windows=config.shuffle_windows,
        num_epochs=None,
        drop_last=True,
    )


def _served_array(activations: torch.Tensor, keep: torch.Tensor) -> np.ndarray:
    """Return the served positions of ``activations`` [n_seq, n_pos, d_in] as a [n_tokens, d_in] array."""
    return _as_array(activations[keep.to(activations.device)])


def _as_array(served: torch.Tensor) -> np.ndarray:
    """Return served activations [n_tokens, d_in] as a numpy array in main memory.

    numpy has no bfloat16, so bfloat16 activations travel as their int16 bit patterns; the
    client views them back as bfloat16 without a copy.
    """
    served = served.contiguous().cpu()
    if served.dtype == torch.bfloat16:
        return served.view(torch.int16).numpy()
    return served.numpy()


def _live_owned_objects() -> int | None:
    """Return the number of objects in this worker's Ray reference table, or None if unavailable."""
    try:
        core_worker = ray._private.worker.global_worker.core_worker
        return len(core_worker.get_all_reference_counts())
    except AttributeError:
        # NOTE: get_all_reference_counts is a private Ray API (present in 2.60); stats omit it
        # on versions without it.
        return None


class _ActivationServer:
    """The activation server's implementation: a model, a token stream and their subscribers.

    Run it as a Ray actor through :func:`start_server`; :class:`ActivationServer` is the
    actor class.
    """

    def __init__(self, config: ServerConfig):
        self.config = config
        # Subscriber ids embed this id, so an id issued before a restart is unknown afterwards.
        self.incarnation = uuid.uuid4().hex[:8]
        restarted = _was_reconstructed()
        if restarted:
            logger.warning("activation server for %s restarted; subscribers must subscribe again", config.model)
        self._set_torch_threads()

        self.info = model_info(config.model, random_weights=config.random_weights, **config.load_options)
        for hookpoint in config.hookpoints:
            self.info.hook_layer(hookpoint)
        self.model, self.tokenizer = load_model(
            config.model,
            dtype=config.dtype,
            device=config.device,
            random_weights=config.random_weights,
            seed=config.model_seed,
            **config.load_options,
        )

        self.lm_forward_tokens = 0
        self.lm_forward_batches = 0
        self.served_tokens = {hookpoint: 0 for hookpoint in config.hookpoints}
        self.norm_estimate_forward_tokens = 0
        self.reused_estimate_batches = 0
        # Served arrays of the estimate's batches, by sequence number, until served.
        self._estimate_arrays: dict[int, dict[str, np.ndarray]] = {}
        self.norm_scales = self._estimate_norm_scales()

        self._batches = iter(self._token_stream())
        self._stream_position = 0
        self._fanout = FanOut(config.max_batches_in_flight, config.subscriber_timeout_s)
        self._stop = threading.Event()
        self._producer = threading.Thread(target=self._produce, name="activation-producer", daemon=True)
        self._producer.start()
        logger.info(
            "activation server %s ready: model %s, hookpoints %s, %d windows of %d tokens per batch",
            self.incarnation, config.model, list(config.hookpoints),
            config.sequences_per_batch, config.context_size,
        )

    # -- requests from clients ---------------------------------------------------------------

    def ready(self) -> dict[str, Any]:
        """Return the server's identity, Ray node id, hookpoints, widths and normalization scales."""
        return {
            "incarnation": self.incarnation,
            "model": self.config.model,
            "hookpoints": list(self.config.hookpoints),
            "d_in": {h: self.info.hook_d_in(h) for h in self.config.hookpoints},
            "norm_scales": dict(self.norm_scales),
            "dtype": self.config.dtype,
            "prepend_bos": self.config.prepend_bos if self.config.prepend_bos is not None else self.info.prepend_bos,
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    def subscribe(self, hookpoint: str, resume_seq: int | None = None) -> dict[str, Any]:
        """Register a subscriber of ``hookpoint`` and return its id, start batch and scale.

        ``resume_seq`` is the next batch a subscriber needs after losing a previous server
        incarnation; see :meth:`FanOut.subscribe`.
        """
        self._check_hookpoint(hookpoint)
        subscriber = self._fanout.subscribe(hookpoint, resume_seq=resume_seq)
        subscriber_id = f"{self.incarnation}-{subscriber.subscriber_id}"
        logger.info("subscriber %s joined %s at batch %d", subscriber_id, hookpoint, subscriber.start_seq)
        return {
            "subscriber_id": subscriber_id,
            "start_seq": subscriber.start_seq,
            "hookpoint": hookpoint,
            "d_in": self.info.hook_d_in(hookpoint),
            "dtype": self.config.dtype,
            "norm_scale": self.norm_scales[hookpoint],
        }

    def poll(
        self, subscriber_id: str, next_seq: int, max_batches: int = 2, timeout_s: float = 5.0
    ) -> list[tuple[int, ray.ObjectRef, int]] | None:
        """Acknowledge batches before ``next_seq``; return up to ``max_batches`` newer ones.

        Each batch is ``(seq, object_ref, n_tokens)``; the object is a ``[n_tokens, d_in]``
        numpy array. Waits up to ``timeout_s`` for a batch and may return an empty list.
        Returns None for an unknown subscriber id: the caller must subscribe again.
        """
        local_id = self._local_id(subscriber_id)
        if local_id is None:
            return None
        batches = self._fanout.poll(local_id, next_seq, max_batches, timeout_s)
        if batches is None:
            return None
        return [(b.seq, b.handle, b.n_tokens) for b in batches]

    def unsubscribe(self, subscriber_id: str, next_seq: int | None = None) -> bool:
        """Remove a subscriber so it no longer holds back the producer; False if unknown."""
        local_id = self._local_id(subscriber_id)
        removed = local_id is not None and self._fanout.unsubscribe(local_id, next_seq)
        if removed:
            logger.info("subscriber %s left", subscriber_id)
        return removed

    def norm_scale(self, hookpoint: str) -> float:
        """Return ``sqrt(d_in) / mean ||x||_2`` estimated for ``hookpoint``."""
        self._check_hookpoint(hookpoint)
        return self.norm_scales[hookpoint]

    def stats(self) -> dict[str, Any]:
        """Return the server's node and hookpoints, and counters: forward tokens, served
        tokens, held batches and subscribers.

        ``lm_forward_tokens`` counts every position of the batches served to subscribers,
        each run forward once. The normalization estimate runs the stream's first batches
        forward before anyone subscribes and keeps their activations, so the first batches
        served are not run again (``reused_estimate_batches`` counts them).
        ``norm_estimate_forward_tokens`` counts the estimate's positions not served, so the
        two counters add up to every position the model ran forward.
        """
        return {
            "incarnation": self.incarnation,
            "node_id": ray.get_runtime_context().get_node_id(),
            "hookpoints": list(self.config.hookpoints),
            "lm_forward_tokens": self.lm_forward_tokens,
            "lm_forward_batches": self.lm_forward_batches,
            "norm_estimate_forward_tokens": self.norm_estimate_forward_tokens,
            "reused_estimate_batches": self.reused_estimate_batches,
            "served_tokens": dict(self.served_tokens),
            "next_seq": self._fanout.next_seq,
            "held_batches": self._fanout.held_counts(),
            "live_owned_objects": _live_owned_objects(),
            "expired_subscribers": self._fanout.expired_subscribers,
            "subscribers": {
                f"{self.incarnation}-{local_id}": counts
                for local_id, counts in self._fanout.subscriber_stats().items()
            },
        }

    def shutdown(self) -> None:
        """Stop the producer thread and wake waiting polls."""
        self._stop.set()
        self._fanout.close()
        self._producer.join(timeout=60)

    # -- the producer ------------------------------------------------------------------------

    def _produce(self) -> None:
        try:
            while True:
                seq = self._fanout.wait_for_room(self._stop)
                if seq is None:
                    return
                hookpoints = self._fanout.active_hookpoints()
                batch = self._token_batch(seq)
                arrays = self._kept_arrays(seq, batch)
                if arrays is None:
                    activations = run_hookpoints(self.model, batch.tokens.to(self.config.device), hookpoints)
                    arrays = {hookpoint: _served_array(activations[hookpoint], batch.keep) for hookpoint in hookpoints}
                    del activations
                published = {}
                for hookpoint in hookpoints:
                    array = arrays[hookpoint]
                    published[hookpoint] = HeldBatch(seq, ray.put(array), array.shape[0])
                    self.served_tokens[hookpoint] += array.shape[0]
                del arrays
                self.lm_forward_tokens += batch.tokens.numel()
                self.lm_forward_batches += 1
                self._fanout.publish(seq, published)
        except Exception as error:
            logger.exception("activation producer of %s failed; polls will raise this error", self.config.model)
            self._fanout.fail(error)

    def _token_batch(self, seq: int) -> TokenBatch:
        """Return the token batch of sequence number ``seq``, skipping batches before it."""
        if seq > self._stream_position:
            logger.info("skipping %d token batches to resume the stream at batch %d", seq - self._stream_position, seq)
        while self._stream_position < seq:
            next(self._batches)
            self._stream_position += 1
        self._stream_position += 1
        return next(self._batches)

    def _token_stream(self) -> TokenStream:
        return open_token_stream(self.config, self.tokenizer, self.info.token_policy())

    def _kept_arrays(self, seq: int, batch: TokenBatch) -> dict[str, np.ndarray] | None:
        """Return the estimate's served arrays of batch ``seq`` and forget them, or None.

        Kept batches before ``seq`` are dropped too: a stream resumed later never serves them.
        """
        for earlier in [kept for kept in self._estimate_arrays if kept < seq]:
            del self._estimate_arrays[earlier]
        arrays = self._estimate_arrays.pop(seq, None)
        if arrays is not None:
            self.reused_estimate_batches += 1
            self.norm_estimate_forward_tokens -= batch.tokens.numel()
        return arrays

    # -- normalization -----------------------------------------------------------------------

    def _estimate_norm_scales(self) -> dict[str, float]:
        """Estimate ``sqrt(d_in) / mean ||x||_2`` per hookpoint from the first served tokens.

        This is SAELens's ``expected_average_only_in`` normalization: multiplying
        activations by the scale makes their mean squared norm about ``d_in``. The estimate
        reads the first ``norm_estimate_tokens`` served positions of the stream, so a
        restarted server computes the same scales. The served activations of these batches
        are kept, up to ``norm_estimate_keep_bytes``, to be served as the stream's first
        batches.
        """
        hookpoints = list(self.config.hookpoints)
        norm_sums = {hookpoint: 0.0 for hookpoint in hookpoints}
        n_tokens = 0
        kept_bytes = 0
        for seq, batch in enumerate(self._token_stream()):
            activations = run_hookpoints(self.model, batch.tokens.to(self.config.device), hookpoints)
            served = {
                hookpoint: activations[hookpoint][batch.keep.to(self.config.device)] for hookpoint in hookpoints
            }
            del activations
            for hookpoint, tensor in served.items():
                norm_sums[hookpoint] += tensor.double().norm(dim=-1).sum().item()
            size = sum(tensor.numel() * tensor.element_size() for tensor in served.values())
            # Only a run of batches from the stream's start can be served without a gap.
            if len(self._estimate_arrays) == seq and kept_bytes + size <= self.config.norm_estimate_keep_bytes:
                self._estimate_arrays[seq] = {hookpoint: _as_array(tensor) for hookpoint, tensor in served.items()}
                kept_bytes += size
            n_tokens += int(batch.keep.sum())
            self.norm_estimate_forward_tokens += batch.tokens.numel()
            if n_tokens >= self.config.norm_estimate_tokens:
                break
        if n_tokens == 0:
            raise RuntimeError(
                f"the token stream of {self.config.dataset!r} served no positions, so no "
                "normalization scale can be estimated. Check the dataset and context_size."
            )
        scales = {
            hookpoint: math.sqrt(self.info.hook_d_in(hookpoint)) / (norm_sums[hookpoint] / n_tokens)
            for hookpoint in hookpoints
        }
        logger.info("normalization scales from %d tokens: %s", n_tokens, scales)
        return scales

    # -- helpers -----------------------------------------------------------------------------

    def _check_hookpoint(self, hookpoint: str) -> None:
        if hookpoint not in self.norm_scales:
            raise ValueError(
                f"hookpoint {hookpoint!r} is not served by this server. Request one of "
                f"{list(self.config.hookpoints)}, or add it to ServerConfig.hookpoints."
            )

    def _local_id(self, subscriber_id: str) -> int | None:
        incarnation, _, local = subscriber_id.partition("-")
        if incarnation != self.incarnation or not local.isdigit():
            return None
        return int(local)

    def _set_torch_threads(self) -> None:
        threads = self.config.torch_threads
        if threads is None:
            assigned = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
            threads = max(1, int(assigned))
        torch.set_num_threads(threads)


def _was_reconstructed() -> bool:
    # Ray 2.60 reads its own deprecated actor_id property here and warns about it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return ray.get_runtime_context().was_current_actor_reconstructed


ActivationServer = ray.remote(_ActivationServer)
"""The Ray actor class; create it with :func:`start_server`."""


def start_server(
    config: ServerConfig,
    *,
    name: str | None = None,
    num_cpus: float = 1,
    num_gpus: float = 0,
    resources: dict[str, float] | None = None,
    max_restarts: int = 3,
    max_concurrency: int = 64,
    wait: bool = True,
    scheduling_strategy: Any = None,
) -> ray.actor.ActorHandle:
    """Start an activation server actor and return its handle.

    Args:
        config: What to serve.
        name: Ray actor name, so other processes can find it with ``ray.get_actor``.
        num_cpus: CPUs reserved for the actor; the forward pass uses that many torch threads
            unless ``config.torch_threads`` is set.
        num_gpus: GPUs reserved for the actor; set ``config.device`` to match.
        resources: Custom Ray resources, e.g. ``{"activation_server": 1}``.
        max_restarts: Restarts after the actor process dies; clients subscribe again.
        max_concurrency: Request threads; each client keeps at most one poll waiting, so
            this bounds the clients served without queueing.
        wait: Block until the model is loaded and the normalization scales are estimated.
        scheduling_strategy: Ray scheduling strategy of the actor, e.g. a placement group
            reserved for it; None lets Ray choose a node.
    """
    actor = ActivationServer.options(
        name=name,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        resources=resources or {},
        max_restarts=max_restarts,
        # Calls in flight when the actor dies are retried on the restarted actor, which
        # returns "unknown subscriber" for them, so the client subscribes again.
        max_task_retries=-1,
        max_concurrency=max_concurrency,
        scheduling_strategy=scheduling_strategy,
    ).remote(config)
    if wait:
        ray.get(actor.ready.remote())
    return actor
