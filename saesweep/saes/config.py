"""The SAE configuration shared by every architecture."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

# Fields written at the top level of a SAELens v6 cfg.json.
INFERENCE_FIELDS = (
    "d_in",
    "d_sae",
    "dtype",
    "device",
    "apply_b_dec_to_input",
    "normalize_activations",
    "reshape_activations",
)

# Fields that describe where the activations come from. SAELens v6 keeps them
# under cfg.json "metadata"; here they are also plain keyword arguments.
METADATA_FIELDS = (
    "model_name",
    "hook_name",
    "hook_head_index",
    "context_size",
    "prepend_bos",
    "dataset_path",
    "model_from_pretrained_kwargs",
    "seqpos_slice",
)

NORMALIZATIONS = ("none", "expected_average_only_in")


def parse_dtype(name: str) -> torch.dtype:
    """Return the torch dtype named `name` ("float32", "torch.bfloat16", ...)."""
    key = str(name).removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use one of {sorted(DTYPES)}")
    return DTYPES[key]


@dataclass
class SAEConfig:
    """Configuration of one sparse autoencoder, for training and for inference.

    Architecture-specific fields are ignored by the architectures that do not
    use them. Field names follow SAELens v6, so a cfg.json moves both ways.
    """

    architecture: str = "standard"
    """SAE architecture: one of `saesweep.saes.list_architectures()`."""
    d_in: int = 0
    """Width of the input activations."""
    d_sae: int = 0
    """Number of latents."""
    dtype: str = "float32"
    """Parameter dtype: float32, bfloat16, float16 or float64."""
    device: str = "cpu"
    """Device the parameters live on."""
    apply_b_dec_to_input: bool = True
    """Subtract the decoder bias from the input before encoding."""
    normalize_activations: str = "none"
    """"none", or "expected_average_only_in": inputs are multiplied by a fixed
    scale so that their mean norm is sqrt(d_in) (Anthropic, "Circuits Updates -
    April 2024"). The scale is folded into the weights when the SAE is saved."""
    reshape_activations: str = "none"
    """Only "none" is supported."""
    seed: int = 0
    """Seed of the weight initialization."""
    decoder_init_norm: float | None = None
    """Norm of each decoder row at initialization; None takes the architecture's
    default (0.1 where the sparsity penalty is weighted by the decoder norm,
    1.0 where decoder rows are kept at unit norm)."""

    # standard and gated
    l1_coefficient: float = 1.0
    """Weight of the sparsity penalty (standard, gated)."""
    lp_norm: float = 1.0
    """p of the Lp sparsity penalty of the standard architecture."""

    # jumprelu
    l0_coefficient: float = 1.0
    """Weight of the L0 penalty (jumprelu)."""
    jumprelu_init_threshold: float = 0.01
    """Initial threshold of every latent (jumprelu)."""
    jumprelu_bandwidth: float = 0.05
    """Width of the rectangle kernel of the threshold's straight-through
    estimator (jumprelu)."""
    pre_act_loss_coefficient: float | None = None
    """Weight of the pre-activation loss on dead latents (jumprelu); None disables it."""

    # topk and batchtopk
    k: int = 32
    """Active latents per token (topk), or on average over the batch (batchtopk)."""
    aux_k: int | None = None
    """Dead latents used by the AuxK loss; None means d_in // 2."""
    aux_k_coefficient: float = 1 / 32
    """Weight of the AuxK loss (topk, batchtopk)."""
    topk_threshold_lr: float = 0.01
    """Rate of the moving average that sets the inference threshold (batchtopk)."""

    # where the activations come from, saved under cfg.json "metadata"
    model_name: str | None = None
    hook_name: str | None = None
    hook_head_index: int | None = None
    context_size: int | None = None
    prepend_bos: bool | None = None
    dataset_path: str | None = None
    model_from_pretrained_kwargs: dict[str, Any] = field(default_factory=dict)
    seqpos_slice: tuple[int | None, ...] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    """Further metadata saved as is (served positions, training details)."""

    def __post_init__(self) -> None:
        from saesweep.saes.registry import get_architecture

        get_architecture(self.architecture)
        parse_dtype(self.dtype)
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(
                f"d_in and d_sae must be positive, got d_in={self.d_in}, d_sae={self.d_sae}"
            )
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(
                f"normalize_activations={self.normalize_activations!r} is not supported: "
                f"use one of {list(NORMALIZATIONS)}"
            )
        if self.reshape_activations != "none":
            raise ValueError(
                f"reshape_activations={self.reshape_activations!r} is not supported: use 'none'"
            )
        if self.architecture in ("topk", "batchtopk") and not 0 < self.k <= self.d_sae:
            raise ValueError(
                f"k={self.k} must be in [1, d_sae={self.d_sae}]: lower k or raise d_sae"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    def replace(self, **changes: Any) -> SAEConfig:
        """Return a copy with `changes` applied."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        """Build a config from `to_dict()` output or a SAELens v6 cfg.json dict.

        SAELens metadata fields are lifted to the top level; unknown metadata
        keys are kept in `metadata`; other unknown top-level keys are dropped,
        as SAELens does.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in names and key != "metadata"}
        metadata = dict(data.get("metadata") or {})
        for key in METADATA_FIELDS:
            if key in metadata and values.get(key) is None:
                values[key] = metadata.pop(key)
            else:
                metadata.pop(key, None)
        if values.get("model_from_pretrained_kwargs") is None:
            values["model_from_pretrained_kwargs"] = {}
        if values.get("seqpos_slice") is not None:
            values["seqpos_slice"] = tuple(values["seqpos_slice"])
        values["metadata"] = metadata
        return cls(**values)
