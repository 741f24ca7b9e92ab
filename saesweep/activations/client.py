"""The activation client: a plain Python iterator of activation batches read from a server.

A trainer iterates an :class:`ActivationClient` and gets ``[batch_size, d_in]`` tensors, so it
never touches Ray. The client subscribes to one hookpoint of an activation server and keeps one
poll in flight, so the next batches arrive while the trainer works. It copies each served batch
out of the object store into a :class:`ShuffleBuffer`, then acknowledges the batch so the server
can release it. When the server actor dies and Ray restarts it, the objects it had put are
lost. The client then subscribes again and continues from the batch it needed next. The
first client to return numbers the restarted stream, so another client may skip a batch or two
(one whose hookpoint was not yet subscribed when it ran forward) but never reads one twice.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, NamedTuple

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError

from saesweep.activations.shuffle import ShuffleBuffer

logger = logging.getLogger(__name__)

# Errors after which the server's objects or the subscription are gone, but a restarted
# server can serve again. OwnerDiedError is an ObjectLostError.
_SERVER_LOST = (RayActorError, ObjectLostError)


class ReceivedBatch(NamedTuple):
    """A served batch as the client received it."""

    seq: int
    """Sequence number of the forward batch on the server."""
    n_tokens: int
    """Token activations in the batch."""


class ActivationClient:
    """Iterator of ``[batch_size, d_in]`` activations of one hookpoint, shuffled across sequences.

    Args:
        server: Handle of an activation server (see ``start_server``).
        hookpoint: Hookpoint to read, one of the server's ``ServerConfig.hookpoints``.
        batch_size: Tokens per returned batch.
        shuffle_buffer_tokens: Capacity of the shuffle buffer in tokens; 0 keeps server order.
        seed: Seed of the shuffle.
        dtype: dtype of the returned tensors; the server's dtype is converted on the way out.
        max_batches_per_poll: Served batches fetched per request.
        poll_timeout_s: How long one request waits on the server for a new batch.
        reconnect_timeout_s: How long to keep subscribing again after the server is lost
            before raising.
        batch_history: How many of the latest :class:`ReceivedBatch` records to keep in
            :attr:`batches_received`.
    """

    def __init__(
        self,
        server: ray.actor.ActorHandle,
        hookpoint: str,
        *,
        batch_size: int,
        shuffle_buffer_tokens: int = 32_768,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        max_batches_per_poll: int = 2,
        poll_timeout_s: float = 5.0,
        reconnect_timeout_s: float = 300.0,
        batch_history: int = 10_000,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is invalid. Set it to 1 or more tokens.")
        if max_batches_per_poll < 1:
            raise ValueError(
                f"max_batches_per_poll={max_batches_per_poll} is invalid. Set it to 1 or more."
            )
        self.server = server
        self.hookpoint = hookpoint
        self.batch_size = batch_size
        self.dtype = dtype
        self.max_batches_per_poll = max_batches_per_poll
        self.poll_timeout_s = poll_timeout_s
        self.reconnect_timeout_s = reconnect_timeout_s
        self._buffer = ShuffleBuffer(shuffle_buffer_tokens, seed=seed)

        self.tokens_delivered = 0
        """Tokens returned to the caller."""
        self.tokens_received = 0
        """Tokens fetched from the server, including those still in the shuffle buffer."""
        self.batches_received: deque[ReceivedBatch] = deque(maxlen=batch_history)
        """The latest served batches received, oldest first."""
        self.resubscriptions = 0
        """How many times the client subscribed again after losing its server."""

        self._subscription: dict[str, Any] | None = None
        self._next_seq: int | None = None
        self._pending_poll: ray.ObjectRef | None = None
        self._closed = False
        self._subscribe()

    # -- public API --------------------------------------------------------------------------

    @property
    def norm_scale(self) -> float:
        """``sqrt(d_in) / mean ||x||_2`` of this hookpoint, estimated once by the server."""
        return self._subscription["norm_scale"]

    @property
    def d_in(self) -> int:
        """Width of this hookpoint's activations."""
        return self._subscription["d_in"]

    @property
    def subscriber_id(self) -> str:
        """This client's id on the current server incarnation."""
        return self._subscription["subscriber_id"]

    def __iter__(self) -> ActivationClient:
        return self

    def __next__(self) -> torch.Tensor:
        """Return the next ``[batch_size, d_in]`` batch, waiting for the server as needed."""
        if self._closed:
            raise StopIteration
        while self._buffer.ready_tokens < self.batch_size:
            chunk = self._fetch()
            if chunk is not None:
                self._buffer.add(chunk)
        batch = self._buffer.take(self.batch_size).to(self.dtype)
        self.tokens_delivered += self.batch_size
        return batch

    def close(self) -> None:
        """Unsubscribe, acknowledging every batch received, so the server stops waiting for this client."""
        if self._closed:
            return
        self._closed = True
        self._pending_poll = None
        if self._subscription is None:
            return
        try:
            ray.get(
                self.server.unsubscribe.remote(self.subscriber_id, self._next_seq),
                timeout=self.poll_timeout_s + 30,
            )
        except (*_SERVER_LOST, GetTimeoutError) as error:
            # A dead or unreachable server keeps no batch for this client any more.
            logger.warning("could not unsubscribe %s from %s: %r", self.subscriber_id, self.hookpoint, error)

    def __enter__(self) -> ActivationClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- fetching ----------------------------------------------------------------------------

    def _fetch(self) -> torch.Tensor | None:
        """Fetch the next served batches as one ``[n_tokens, d_in]`` tensor, or None if none came."""
        try:
            if self._pending_poll is None:
                self._pending_poll = self._request_poll()
            reply = ray.get(self._pending_poll)
            self._pending_poll = None
            if reply is None:
                logger.info(
                    "the server has no subscriber %s (it restarted); subscribing again", self.subscriber_id
                )
                self._resubscribe()
                return None
            reply = [entry for entry in reply if entry[0] >= self._next_seq]
            if not reply:
                self._pending_poll = self._request_poll()
                return None
            arrays = ray.get([ref for _, ref, _ in reply])
        except _SERVER_LOST as error:
            logger.warning("lost the activation server of %s (%r); subscribing again", self.hookpoint, error)
            self._pending_poll = None
            self._resubscribe()
            return None

        # Copy out of the object store: zero-copy views kept in the shuffle buffer would pin
        # acknowledged objects in shared memory beyond max_batches_in_flight.
        chunk = self._to_tensor(np.concatenate(arrays) if len(arrays) > 1 else np.array(arrays[0]))
        del arrays
        self.batches_received.extend(ReceivedBatch(seq, n_tokens) for seq, _, n_tokens in reply)
        self.tokens_received += chunk.shape[0]
        self._next_seq = reply[-1][0] + 1
        self._pending_poll = self._request_poll()
        return chunk

    def _request_poll(self) -> ray.ObjectRef:
        return self.server.poll.remote(
            self.subscriber_id, self._next_seq, self.max_batches_per_poll, self.poll_timeout_s
        )

    def _to_tensor(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self._subscription["dtype"] == "bfloat16":
            tensor = tensor.view(torch.bfloat16)
        return tensor

    # -- subscribing -------------------------------------------------------------------------

    def _subscribe(self, resume_seq: int | None = None) -> None:
        """Subscribe to the hookpoint, retrying while the server restarts."""
        deadline = time.monotonic() + self.reconnect_timeout_s
        request = None
        while True:
            try:
                # Wait on one request rather than sending another on a timeout, because a
                # duplicate that the server completes later would leave a subscriber that never polls.
                if request is None:
                    request = self.server.subscribe.remote(self.hookpoint, resume_seq)
                subscription = ray.get(request, timeout=max(0.0, deadline - time.monotonic()))
                break
            except GetTimeoutError as error:
                raise self._unavailable(error) from error
            except _SERVER_LOST as error:
                if time.monotonic() >= deadline:
                    raise self._unavailable(error) from error
                logger.info("activation server unavailable (%r); subscribing again", error)
                request = None
                time.sleep(1.0)
        self._subscription = subscription
        start = subscription["start_seq"]
        # Batches before this client's position were already received from the previous server.
        self._next_seq = start if self._next_seq is None else max(self._next_seq, start)
        logger.info(
            "subscribed to %s as %s from batch %d", self.hookpoint, subscription["subscriber_id"], start
        )

    def _unavailable(self, error: Exception) -> RuntimeError:
        return RuntimeError(
            f"could not subscribe to {self.hookpoint!r} within {self.reconnect_timeout_s:.0f} s: "
            f"the activation server is unavailable ({error!r}). Check that it is running, or "
            "raise reconnect_timeout_s."
        )

    def _resubscribe(self) -> None:
        self.resubscriptions += 1
        self._subscribe(resume_seq=self._next_seq)
