"""Documents for the token stream: which files or Hub dataset they come from, and the held-out split.

A dataset is named by one of:

- ``"embedded"``: the Shakespeare texts of the embedded corpus, one document per file;
- local files or folders (``.txt``: one document per file, ``.jsonl``/``.json``: one per
  record, ``.parquet``: one per row), or a glob pattern;
- any other string is a Hugging Face Hub dataset, read with ``streaming=True``.

Documents are split once into ``"train"`` and ``"heldout"`` by a seeded hash of their text, so the
split does not depend on file order or on the shuffle seed.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from saesweep.activations import embedded

logger = logging.getLogger(__name__)

SPLITS = ("train", "heldout")
"""Names of the two document splits."""

_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_STREAMING_SHUFFLE_DOCUMENTS = 10_000


def document_split_key(text: str, *, split_seed: int) -> float:
    """Return a number in [0, 1) that places a document in a split, from a seeded hash of its text."""
    digest = hashlib.blake2b(
        text.encode("utf-8"), digest_size=8, salt=split_seed.to_bytes(8, "little", signed=True)
    ).digest()
    return int.from_bytes(digest, "little") / 2**64


def _resolve_local_files(dataset: str | Path | Sequence[str | Path]) -> list[Path] | None:
    """Return the local data files ``dataset`` names, or ``None`` if it names a Hub dataset."""
    if isinstance(dataset, str) and dataset == embedded.EMBEDDED_CORPUS_NAME:
        return embedded.embedded_corpus_files()
    entries = [dataset] if isinstance(dataset, (str, Path)) else list(dataset)
    files: list[Path] = []
    for entry in entries:
        path = Path(entry).expanduser()
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix in _BUILDERS))
        elif path.is_file():
            files.append(path)
        elif glob.has_magic(str(entry)):
            files.extend(sorted(Path(p) for p in glob.glob(str(path), recursive=True)))
        elif isinstance(dataset, str) and not _looks_like_path(dataset):
            return None
        else:
            raise FileNotFoundError(f"Data file {str(entry)!r} does not exist. Check the path.")
    if not files:
        raise FileNotFoundError(
            f"No data files found for dataset {dataset!r}. Name files or folders containing "
            f"{', '.join(_BUILDERS)} files."
        )
    return files


def _looks_like_path(name: str) -> bool:
    """Return whether a string that names no existing file still reads as a file path, not a Hub name."""
    return name.startswith(("/", "./", "../", "~")) or Path(name).suffix in _BUILDERS


def _builder_for(files: Sequence[Path]) -> str:
    builders = {_BUILDERS.get(p.suffix) for p in files}
    if None in builders or len(builders) != 1:
        suffixes = sorted({p.suffix or "(none)" for p in files})
        raise ValueError(
            f"Data files must all be of one kind, {', '.join(_BUILDERS)}; got suffixes {suffixes}. "
            "Pass one kind of file per dataset."
        )
    return builders.pop()


class DocumentSource:
    """The documents of one dataset split, in a seeded order per epoch.

    Local files are read as an HF ``Dataset``. Their held-out split is the ``heldout_fraction`` of
    documents (at least one) with the smallest split keys. A Hub dataset is read with
    ``streaming=True``, and a document is held out when its split key is below
    ``heldout_fraction``, so its held-out share is ``heldout_fraction`` only on average. Empty and
    whitespace-only documents are skipped.
    """

    def __init__(
        self,
        dataset: str | Path | Sequence[str | Path],
        *,
        split: str = "train",
        split_seed: int = 0,
        heldout_fraction: float = 0.05,
        text_column: str = "text",
        hub_config: str | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}. Use one of: {', '.join(SPLITS)}.")
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(
                f"heldout_fraction must be between 0 and 1 (exclusive), got {heldout_fraction}."
            )
        self.dataset = dataset
        self.split = split
        self.split_seed = split_seed
        self.heldout_fraction = heldout_fraction
        self.text_column = text_column
        self.hub_config = hub_config
        self._files = _resolve_local_files(dataset)
        self._local = None if self._files is None else self._load_local()

    @property
    def dataset_path(self) -> str:
        """The dataset as recorded in an SAE's config: the name, or the comma-joined file paths."""
        if isinstance(self.dataset, (str, Path)):
            return str(self.dataset)
        return ",".join(str(p) for p in self.dataset)

    @property
    def streaming(self) -> bool:
        """Whether the documents are streamed from the Hub."""
        return self._files is None

    def __len__(self) -> int:
        """Number of documents in this split; only local datasets have one."""
        if self._local is None:
            raise TypeError(f"Streamed dataset {self.dataset_path!r} has no known length.")
        return len(self._local)

    def _check_column(self, column_names: Sequence[str] | None) -> None:
        if column_names is not None and self.text_column not in column_names:
            raise ValueError(
                f"Dataset {self.dataset_path!r} has no column {self.text_column!r}; its columns "
                f"are {list(column_names)}. Set the text column to one of them."
            )

    def _load_local(self) -> Any:
        from datasets import load_dataset

        assert self._files is not None
        builder = _builder_for(self._files)
        options: dict[str, Any] = {"sample_by": "document"} if builder == "text" else {}
        # Read once into the HF datasets cache and memory-mapped from there, so a large local
        # dataset does not have to fit in memory.
        data = load_dataset(builder, data_files=[str(p) for p in self._files], split="train", **options)
        self._check_column(data.column_names)
        data = data.select_columns([self.text_column])

        keys: list[float] = []
        indices: list[int] = []
        for rows in data.iter(batch_size=1024):
            for text in rows[self.text_column]:
                if _is_blank(text):
                    keys.append(math.inf)
                    continue
                indices.append(len(keys))
                keys.append(document_split_key(text, split_seed=self.split_seed))
        if len(indices) < 2:
            raise ValueError(
                f"Dataset {self.dataset_path!r} has {len(indices)} non-empty document(s), but a "
                "train and a held-out split need at least 2. Add documents."
            )
        indices.sort(key=keys.__getitem__)
        n_heldout = min(len(indices) - 1, max(1, round(self.heldout_fraction * len(indices))))
        chosen = indices[:n_heldout] if self.split == "heldout" else indices[n_heldout:]
        logger.info(
            "Dataset %s: %d non-empty documents, %d in split %r",
            self.dataset_path,
            len(indices),
            len(chosen),
            self.split,
        )
        return data.select(sorted(chosen))

    def _stream_hub(self, seed: int, epoch: int) -> Iterator[str]:
        from datasets import load_dataset

        # NOTE: the tests run offline, so this Hub path is untested. It reads the dataset's
        # "train" split only; a dataset without one fails in load_dataset.

        data = load_dataset(str(self.dataset), self.hub_config, split="train", streaming=True)
        self._check_column(data.column_names)
        data = data.shuffle(seed=seed, buffer_size=_STREAMING_SHUFFLE_DOCUMENTS)
        data.set_epoch(epoch)
        want_heldout = self.split == "heldout"
        for row in data:
            text = row[self.text_column]
            if _is_blank(text):
                continue
            key = document_split_key(text, split_seed=self.split_seed)
            if (key < self.heldout_fraction) == want_heldout:
                yield text

    def documents(self, *, seed: int = 0, epoch: int = 0) -> Iterator[str]:
        """Yield this split's document texts in an order drawn from ``seed`` and ``epoch``."""
        if self._local is None:
            yield from self._stream_hub(seed, epoch)
            return
        order = list(range(len(self._local)))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        for index in order:
            yield self._local[index][self.text_column]


def _is_blank(text: str | None) -> bool:
    return text is None or not text.strip()


