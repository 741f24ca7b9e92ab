"""The token stream: documents tokenized and packed into fixed-size windows of token ids.

The documents of one split come from :class:`~saesweep.activations.documents.DocumentSource`
(the embedded corpus, local files, or a Hub dataset). They are tokenized without special tokens
and concatenated with a separator token between documents. The stream is cut into
``context_size`` windows, each opened by BOS when the model's policy requires it, and the windows
pass through a seeded shuffle buffer before they are batched.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from saesweep.activations.documents import DocumentSource

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_TOKENIZE_BATCH_DOCUMENTS = 64
_TOKENIZE_BATCH_CHARS = 32_768


@dataclass(frozen=True)
class TokenPolicy:
    """A model's token-stream rules: whether windows open with BOS, the separator, and unserved tokens."""

    prepend_bos: bool
    """Whether every window starts with ``bos_token_id``."""
    bos_token_id: int | None
    separator_token_id: int
    """Token placed between two packed documents."""
    special_token_ids: tuple[int, ...]
    """Token ids dropped by :func:`served_positions` wherever they sit."""

    def __post_init__(self) -> None:
        if self.prepend_bos and self.bos_token_id is None:
            raise ValueError(
                "prepend_bos=True needs a bos_token_id, but it is None. Set prepend_bos=False "
                "or give the model's BOS token id."
            )


@dataclass(frozen=True)
class TokenBatch:
    """One batch of packed token windows."""

    tokens: torch.Tensor
    """``[n_seq, context_size]`` int64 token ids."""
    keep: torch.Tensor
    """``[n_seq, context_size]`` bool, True at the positions served to SAE trainers."""


def served_positions(
    tokens: torch.Tensor,
    attention_mask: torch.Tensor | None,
    special_token_ids: Iterable[int],
) -> torch.Tensor:
    """Return the mask of positions whose activations may train an SAE.

    A position is dropped when it is padding (``attention_mask == 0``), when its token is in
    ``special_token_ids`` (BOS, EOS, separator and padding tokens, wherever they sit), or when it
    is the first real position of its row. That first position is column 0, or the first
    unpadded column under left padding: it can attend only to itself, and its residual norm is
    often orders of magnitude above the rest.

    Args:
        tokens: ``[n_seq, n_pos]`` token ids.
        attention_mask: ``[n_seq, n_pos]``, nonzero at real tokens; ``None`` when nothing is padded.
        special_token_ids: Token ids never served.

    Returns:
        ``[n_seq, n_pos]`` bool mask, True where the position is served.
    """
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [n_seq, n_pos], got shape {tuple(tokens.shape)}.")
    if attention_mask is None:
        real = torch.ones_like(tokens, dtype=torch.bool)
    else:
        if attention_mask.shape != tokens.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from tokens shape "
                f"{tuple(tokens.shape)}. Pass the mask returned with these tokens."
            )
        real = attention_mask.to(torch.bool)

    special = torch.tensor(sorted(set(special_token_ids)), dtype=tokens.dtype, device=tokens.device)
    keep = real & ~torch.isin(tokens, special)

    # The first real position of a row is where the cumulative count of real tokens reaches 1.
    first_real = real & (real.cumsum(dim=1) == 1)
    return keep & ~first_real


def tokenize_documents(
    documents: Iterable[str], tokenizer: PreTrainedTokenizerBase
) -> Iterator[list[int]]:
    """Tokenize each document without special tokens, a few documents per tokenizer call.

    A call takes up to ``_TOKENIZE_BATCH_DOCUMENTS`` documents or about ``_TOKENIZE_BATCH_CHARS``
    characters, whichever comes first, so that the first window of a stream of long documents
    does not wait for many of them to be tokenized.
    """
    batch: list[str] = []
    n_chars = 0
    for document in documents:
        batch.append(document)
        n_chars += len(document)
        if len(batch) >= _TOKENIZE_BATCH_DOCUMENTS or n_chars >= _TOKENIZE_BATCH_CHARS:
            yield from tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
            batch, n_chars = [], 0
    if batch:
        yield from tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]


def pack_windows(
    token_documents: Iterable[Sequence[int]], *, context_size: int, policy: TokenPolicy
) -> Iterator[list[int]]:
    """Concatenate documents with the separator between them and cut the result into windows.

    Every window has exactly ``context_size`` tokens; with ``policy.prepend_bos`` its first is
    BOS, followed by ``context_size - 1`` stream tokens. Tokens left over at the end, too few for
    a window, are dropped.
    """
    n_body = context_size - 1 if policy.prepend_bos else context_size
    if n_body < 1:
        raise ValueError(
            f"context_size={context_size} leaves no room for text after BOS. Use at least 2."
        )
    head = [policy.bos_token_id] if policy.prepend_bos else []
    pending: list[int] = []
    for index, document in enumerate(token_documents):
        if index > 0:
            pending.append(policy.separator_token_id)
        pending.extend(document)
        start = 0
        while len(pending) - start >= n_body:
            yield head + pending[start : start + n_body]
            start += n_body
        del pending[:start]


def shuffle_buffered(items: Iterable[Any], *, buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """Yield ``items`` in a random order drawn with ``rng`` through a buffer of ``buffer_size``."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        index = rng.randrange(buffer_size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


class TokenStream:
    """An iterable of :class:`TokenBatch` over one split of a dataset, packed for one model.

    For local files, iterating twice yields the same batches. Epoch ``e`` orders the documents
    and windows with ``(seed, e)``, so every epoch has its own order.

    Args:
        dataset: ``"embedded"``, local files, folders or a glob, or a Hub dataset name.
        tokenizer: The model's tokenizer.
        policy: BOS, separator and special tokens, usually ``ModelInfo.token_policy()``.
        context_size: Tokens per window.
        batch_size: Windows per batch; the last batch may be smaller unless ``drop_last``.
        seed: Seed of the document order and the window shuffle.
        split: ``"train"`` or ``"heldout"``.
        split_seed: Seed of the document split; keep it fixed so held-out text stays held out.
        heldout_fraction: Share of documents in the held-out split.
        text_column: Column holding the text in JSONL, Parquet and Hub datasets.
        shuffle_windows: Size of the window shuffle buffer; 1 keeps the packed order.
        num_epochs: Passes over the split; ``None`` repeats forever.
        drop_last: Drop the last batch when it has fewer than ``batch_size`` windows.
        hub_config: Configuration name of a Hub dataset, if it has several.
    """

    def __init__(
        self,
        dataset: str | Path | Sequence[str | Path],
        tokenizer: PreTrainedTokenizerBase,
        policy: TokenPolicy,
        *,
        context_size: int,
        batch_size: int,
        seed: int = 0,
        split: str = "train",
        split_seed: int = 0,
        heldout_fraction: float = 0.05,
        text_column: str = "text",
        shuffle_windows: int = 1024,
        num_epochs: int | None = 1,
        drop_last: bool = False,
        hub_config: str | None = None,
    ) -> None:
        if context_size < 2:
            raise ValueError(f"context_size must be at least 2, got {context_size}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        if shuffle_windows < 1:
            raise ValueError(f"shuffle_windows must be at least 1, got {shuffle_windows}.")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be at least 1 or None (forever), got {num_epochs}.")
        self.source = DocumentSource(
            dataset,
            split=split,
            split_seed=split_seed,
            heldout_fraction=heldout_fraction,
            text_column=text_column,
            hub_config=hub_config,
        )
        self.tokenizer = tokenizer
        self.policy = policy
        self.context_size = context_size
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_windows = shuffle_windows
        self.num_epochs = num_epochs
        self.drop_last = drop_last

    def _epochs(self) -> Iterator[int]:
        return itertools.count() if self.num_epochs is None else iter(range(self.num_epochs))

    def documents(self) -> Iterator[str]:
        """Yield the document texts of every epoch, in stream order."""
        for epoch in self._epochs():
            yield from self.source.documents(seed=self.seed, epoch=epoch)

    def windows(self) -> Iterator[list[int]]:
        """Yield shuffled ``context_size`` windows of token ids."""
        for epoch in self._epochs():
            documents = self.source.documents(seed=self.seed, epoch=epoch)
            packed = pack_windows(
                tokenize_documents(documents, self.tokenizer),
                context_size=self.context_size,
                policy=self.policy,
            )
            rng = random.Random(f"windows:{self.seed}:{epoch}")
            n_windows = 0
            for window in shuffle_buffered(packed, buffer_size=self.shuffle_windows, rng=rng):
                n_windows += 1
                yield window
            if n_windows == 0:
                raise ValueError(
                    f"Split {self.source.split!r} of dataset {self.source.dataset_path!r} has too "
                    f"few tokens for one window of {self.context_size}. Add text or use a smaller "
                    "context_size."
                )

    def __iter__(self) -> Iterator[TokenBatch]:
        windows = self.windows()
        while batch := list(itertools.islice(windows, self.batch_size)):
            if len(batch) < self.batch_size and self.drop_last:
                return
            tokens = torch.tensor(batch, dtype=torch.int64)
            keep = served_positions(tokens, None, self.policy.special_token_ids)
            yield TokenBatch(tokens=tokens, keep=keep)

