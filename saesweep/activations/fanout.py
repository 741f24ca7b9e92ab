"""Fan-out bookkeeping of the activation server: subscribers, held batches and backpressure.

This module does not depend on models or Ray. It stores opaque batch handles (Ray object
references in the server) by sequence number and tracks each subscriber's cursor. A batch is
released once every subscriber of its hookpoint has acknowledged it, and the producer blocks
while the slowest subscriber is ``max_batches_in_flight`` batches behind. Every method is
thread-safe, because the server's producer thread and its request threads share one instance.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

logger = logging.getLogger(__name__)


@dataclass
class HeldBatch:
    """One published batch of one hookpoint: its handle and how many token activations it contains."""

    seq: int
    handle: Any
    n_tokens: int


@dataclass
class Subscriber:
    """A consumer of one hookpoint and its position in the stream."""

    subscriber_id: int
    hookpoint: str
    cursor: int
    """Sequence number of the first batch this subscriber has not acknowledged yet."""
    start_seq: int
    delivered_batches: int = 0
    delivered_tokens: int = 0
    last_seen: float = field(default_factory=time.monotonic)


class FanOut:
    """Thread-safe registry of subscribers and of the batches held for them.

    Sequence numbers count forward batches: the batch computed by the n-th forward pass has
    ``seq == n`` for every hookpoint it contains. A subscriber acknowledges a batch by polling
    with a ``next_seq`` past it, and a batch is released when no subscriber of its hookpoint
    still needs it. At most ``max_batches_in_flight`` batches per hookpoint are held.
    """

    def __init__(
        self,
        max_batches_in_flight: int,
        subscriber_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        if max_batches_in_flight < 1:
            raise ValueError(
                f"max_batches_in_flight={max_batches_in_flight} is invalid: at least 1 batch "
                "must be held for subscribers to read. Set it to 1 or more."
            )
        self.max_batches_in_flight = max_batches_in_flight
        self.subscriber_timeout_s = subscriber_timeout_s
        self._clock = clock
        self._condition = threading.Condition()
        self._ids = itertools.count(1)
        self._subscribers: dict[int, Subscriber] = {}
        self._held: dict[str, OrderedDict[int, HeldBatch]] = {}
        self._next_seq = 0
        self._published_any = False
        self._closed = False
        self._failure: BaseException | None = None
        self.expired_subscribers = 0

    # -- subscriber side ---------------------------------------------------------------------

    def subscribe(self, hookpoint: str, resume_seq: int | None = None) -> Subscriber:
        """Register a subscriber of ``hookpoint`` and return it.

        A new subscriber joins at the newest batch still held for its hookpoint, or at the
        next batch to be produced. ``resume_seq`` lets a subscriber that lost its server
        continue the numbering. If it is the first subscriber since the server started, the
        stream starts at ``resume_seq`` instead of 0, and the producer skips that many batches
        of tokens without running them forward. Later subscribers cannot move the start,
        because the producer may already be computing the first batch.
        """
        with self._condition:
            if (
                resume_seq is not None
                and not self._subscribers
                and not self._published_any
                and resume_seq > self._next_seq
            ):
                logger.info("stream starts at batch %d, where a resuming subscriber left off", resume_seq)
                self._next_seq = resume_seq
            held = self._held.get(hookpoint)
            start = next(reversed(held)) if held else self._next_seq
            subscriber = Subscriber(
                subscriber_id=next(self._ids),
                hookpoint=hookpoint,
                cursor=start,
                start_seq=start,
                last_seen=self._clock(),
            )
            self._subscribers[subscriber.subscriber_id] = subscriber
            self._condition.notify_all()
            return subscriber

    def unsubscribe(self, subscriber_id: int, next_seq: int | None = None) -> bool:
        """Remove a subscriber, first acknowledging batches before ``next_seq``.

        Returns False when the id is unknown (already removed, expired, or issued by a
        previous incarnation of the server).
        """
        with self._condition:
            subscriber = self._subscribers.get(subscriber_id)
            if subscriber is None:
                return False
            if next_seq is not None:
                self._acknowledge(subscriber, next_seq)
            del self._subscribers[subscriber_id]
            self._release(subscriber.hookpoint)
            self._condition.notify_all()
            return True

    def poll(
        self, subscriber_id: int, next_seq: int, max_batches: int, timeout_s: float
    ) -> list[HeldBatch] | None:
        """Acknowledge batches before ``next_seq`` and return held batches from there on.

        Waits up to ``timeout_s`` for at least one batch, then returns up to ``max_batches``
        batches in sequence order, possibly none. Returns None when the subscriber id is
        unknown, so that the caller subscribes again. Raises the producer's error if the
        producer failed.
        """
        deadline = self._clock() + timeout_s
        with self._condition:
            while True:
                self._raise_failure()
                subscriber = self._subscribers.get(subscriber_id)
                if subscriber is None:
                    return None
                subscriber.last_seen = self._clock()
                self._acknowledge(subscriber, next_seq)
                held = self._held.get(subscriber.hookpoint, {})
                ready = [batch for seq, batch in held.items() if seq >= subscriber.cursor]
                remaining = deadline - self._clock()
                if ready or remaining <= 0 or self._closed:
                    return ready[:max_batches]
                self._condition.wait(remaining)

    # -- producer side -----------------------------------------------------------------------

    def wait_for_room(self, stop: threading.Event, check_interval_s: float = 1.0) -> int | None:
        """Block until some hookpoint has a subscriber and no subscriber is too far behind.

        Returns the sequence number of the batch to produce next, or None when ``stop`` is
        set. Subscribers that have not polled for ``subscriber_timeout_s`` are removed while
        waiting, so that a consumer that vanished without unsubscribing cannot stall the
        stream forever.
        """
        with self._condition:
            while not stop.is_set():
                self._expire_silent_subscribers()
                if self._subscribers and self._lag() < self.max_batches_in_flight:
                    return self._next_seq
                self._condition.wait(check_interval_s)
            return None

    def active_hookpoints(self) -> list[str]:
        """Return the hookpoints that have at least one subscriber, sorted."""
        with self._condition:
            return sorted({s.hookpoint for s in self._subscribers.values()})

    def publish(self, seq: int, batches: dict[str, HeldBatch]) -> None:
        """Hold the batches of forward batch ``seq`` for the current subscribers of each hookpoint.

        A hookpoint whose last subscriber left while the forward pass ran is dropped.
        """
        with self._condition:
            if seq != self._next_seq:
                raise RuntimeError(f"published batch {seq}, but batch {self._next_seq} was expected")
            subscribed = {s.hookpoint for s in self._subscribers.values()}
            for hookpoint, batch in batches.items():
                if hookpoint in subscribed:
                    self._held.setdefault(hookpoint, OrderedDict())[seq] = batch
            for subscriber in self._subscribers.values():
                # A subscriber that joined during this forward pass, on a hookpoint the pass
                # did not compute, starts at the next batch instead.
                if subscriber.hookpoint not in batches and subscriber.cursor == seq:
                    subscriber.cursor = subscriber.start_seq = seq + 1
            self._next_seq = seq + 1
            self._published_any = True
            self._condition.notify_all()

    def fail(self, error: BaseException) -> None:
        """Record the producer's error; every later poll raises it."""
        with self._condition:
            self._failure = error
            self._condition.notify_all()

    def close(self) -> None:
        """Wake every waiting poll, which then returns what it has."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    # -- inspection --------------------------------------------------------------------------

    @property
    def next_seq(self) -> int:
        """Sequence number of the next batch the producer will publish."""
        with self._condition:
            return self._next_seq

    def held_counts(self) -> dict[str, int]:
        """Return the number of batches held per hookpoint."""
        with self._condition:
            return {hookpoint: len(held) for hookpoint, held in self._held.items() if held}

    def subscriber_stats(self) -> dict[int, dict[str, Any]]:
        """Return, per subscriber id, its hookpoint, cursor and delivered counts."""
        with self._condition:
            return {
                s.subscriber_id: {
                    "hookpoint": s.hookpoint,
                    "start_seq": s.start_seq,
                    "cursor": s.cursor,
                    "delivered_batches": s.delivered_batches,
                    "delivered_tokens": s.delivered_tokens,
                }
                for s in self._subscribers.values()
            }

    # -- internals (call with the lock held) -------------------------------------------------

    def _acknowledge(self, subscriber: Subscriber, next_seq: int) -> None:
        # A subscriber cannot acknowledge batches that were never published.
        next_seq = min(next_seq, self._next_seq)
        if next_seq <= subscriber.cursor:
            return
        held = self._held.get(subscriber.hookpoint, {})
        for seq in range(subscriber.cursor, next_seq):
            batch = held.get(seq)
            if batch is not None:
                subscriber.delivered_batches += 1
                subscriber.delivered_tokens += batch.n_tokens
        subscriber.cursor = next_seq
        self._release(subscriber.hookpoint)
        self._condition.notify_all()

    def _release(self, hookpoint: str) -> None:
        held = self._held.get(hookpoint)
        if not held:
            return
        cursors = [s.cursor for s in self._subscribers.values() if s.hookpoint == hookpoint]
        oldest_needed = min(cursors) if cursors else self._next_seq
        while held and next(iter(held)) < oldest_needed:
            held.popitem(last=False)

    def _lag(self) -> int:
        return max(self._next_seq - s.cursor for s in self._subscribers.values())

    def _expire_silent_subscribers(self) -> None:
        now = self._clock()
        for subscriber in list(self._subscribers.values()):
            silent_s = now - subscriber.last_seen
            if silent_s > self.subscriber_timeout_s:
                logger.warning(
                    "removing subscriber %d of %s: no poll for %.0f s (subscriber_timeout_s=%.0f)",
                    subscriber.subscriber_id,
                    subscriber.hookpoint,
                    silent_s,
                    self.subscriber_timeout_s,
                )
                del self._subscribers[subscriber.subscriber_id]
                self._release(subscriber.hookpoint)
                self.expired_subscribers += 1

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise RuntimeError(
                f"the activation server's producer failed: {self._failure!r}"
            ) from self._failure
