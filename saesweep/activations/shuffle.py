"""A seeded shuffle buffer that mixes token activations across sequences and forward batches."""

from __future__ import annotations

import torch


class ShuffleBuffer:
    """A buffer of ``[n_tokens, d_in]`` chunks that releases their tokens in a seeded random order.

    Tokens of one window are strongly correlated, so a trainer that reads them in order gets
    batches dominated by a few contexts. The buffer fills up to ``capacity_tokens``, shuffles,
    and releases half of its tokens while keeping the other half to mix with the next chunks,
    so a released batch draws on several forward batches. ``capacity_tokens=0`` releases
    chunks in arrival order.
    """

    def __init__(self, capacity_tokens: int, *, seed: int = 0):
        if capacity_tokens < 0:
            raise ValueError(
                f"shuffle buffer capacity_tokens={capacity_tokens} is invalid. Use 0 (no "
                "shuffling) or a positive number of tokens."
            )
        self.capacity_tokens = capacity_tokens
        self._generator = torch.Generator().manual_seed(seed)
        self._mixing: list[torch.Tensor] = []
        self._mixing_tokens = 0
        self._ready: list[torch.Tensor] = []
        self._ready_tokens = 0

    @property
    def ready_tokens(self) -> int:
        """Number of shuffled tokens that :meth:`take` can return now."""
        return self._ready_tokens

    @property
    def buffered_tokens(self) -> int:
        """Number of tokens held, shuffled or still mixing."""
        return self._ready_tokens + self._mixing_tokens

    def add(self, chunk: torch.Tensor) -> None:
        """Add a ``[n_tokens, d_in]`` chunk; shuffle and release half once the buffer is full."""
        if chunk.shape[0] == 0:
            return
        if self.capacity_tokens == 0:
            self._push_ready(chunk)
            return
        self._mixing.append(chunk)
        self._mixing_tokens += chunk.shape[0]
        if self._mixing_tokens >= self.capacity_tokens:
            self._mix(release=self._mixing_tokens - self.capacity_tokens // 2)

    def flush(self) -> None:
        """Shuffle every token still mixing and make it ready, for the end of a stream."""
        if self._mixing_tokens:
            self._mix(release=self._mixing_tokens)

    def take(self, n_tokens: int) -> torch.Tensor:
        """Remove and return ``n_tokens`` ready tokens as ``[n_tokens, d_in]``."""
        if n_tokens > self._ready_tokens:
            raise ValueError(
                f"take({n_tokens}) needs {n_tokens} ready tokens, but {self._ready_tokens} are "
                "ready. Add chunks (or flush) until ready_tokens is large enough."
            )
        ready = torch.cat(self._ready) if len(self._ready) > 1 else self._ready[0]
        taken, rest = ready[:n_tokens], ready[n_tokens:]
        self._ready = [rest] if rest.shape[0] else []
        self._ready_tokens = rest.shape[0]
        return taken

    def _mix(self, release: int) -> None:
        pool = torch.cat(self._mixing)
        pool = pool[torch.randperm(pool.shape[0], generator=self._generator)]
        self._push_ready(pool[:release])
        kept = pool[release:]
        self._mixing = [kept] if kept.shape[0] else []
        self._mixing_tokens = kept.shape[0]

    def _push_ready(self, chunk: torch.Tensor) -> None:
        self._ready.append(chunk)
        self._ready_tokens += chunk.shape[0]
