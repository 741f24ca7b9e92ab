"""The SAE base class: parameters, encode/decode, the training loss, folding."""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from saesweep.saes.config import SAEConfig

logger = logging.getLogger(__name__)


@dataclass
class TrainingOutput:
    """Result of `SAE.training_loss` on one batch of N tokens.

    `sae_in` and `sae_out` are on the scale of the input activations, so
    reconstruction metrics computed from them describe the saved SAE.
    """

    loss: torch.Tensor
    """Scalar sum of every entry of `losses`; call backward on it."""
    losses: dict[str, torch.Tensor]
    """Named scalar loss terms, e.g. mse_loss, l1_loss, auxiliary_reconstruction_loss."""
    sae_in: torch.Tensor
    """[N, d_in] input activations."""
    sae_out: torch.Tensor
    """[N, d_in] reconstruction."""
    feature_acts: torch.Tensor
    """[N, d_sae] latent activations."""
    hidden_pre: torch.Tensor
    """[N, d_sae] encoder pre-activations."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Architecture-specific values worth logging (e.g. the batchtopk threshold)."""


@dataclass
class SparseLatents:
    """The selected latents of N tokens in the input form of `F.embedding_bag`.

    Without `offsets`, `indices` and `values` are [N, k]: k latents per token.
    With `offsets` [N], they are flat [M], and token i owns the entries from
    offsets[i] up to offsets[i + 1] (the last token up to M), so a token may
    own none. `values` are activations after ReLU and may contain zeros.
    """

    indices: torch.Tensor
    """Latent indices into the rows of W_dec (int64)."""
    values: torch.Tensor
    """Latent activations, the same shape as `indices`."""
    offsets: torch.Tensor | None = None
    """[N] start of each token's entries in the flat form; None for [N, k]."""

    def decode(self, weight: torch.Tensor) -> torch.Tensor:
        """Return [N, d_in] sums of the rows of `weight` [d_sae, d_in] weighted by `values`.

        This computes what a dense [N, d_sae] latent matrix times `weight` computes,
        but reads only the selected rows. embedding_bag rejects per_sample_weights
        whose dtype differs from the weight's, and latents computed in bfloat16
        under autocast would differ from a float32 W_dec. So the values are cast
        to the weight's dtype, and the sum runs in it even under autocast.
        """
        return F.embedding_bag(
            self.indices,
            weight,
            self.offsets,
            mode="sum",
            per_sample_weights=self.values.to(weight.dtype),
        )


class SAE(nn.Module):
    """A sparse autoencoder whose API and files follow SAELens v6.

    Parameters: `W_enc` [d_in, d_sae], `W_dec` [d_sae, d_in], `b_dec` [d_in],
    and per architecture `b_enc` [d_sae] and others. `encode`, `decode` and
    `forward` accept [..., d_in] with any leading dimensions.

    With `normalize_activations="expected_average_only_in"` the SAE multiplies
    inputs by `activation_norm_scale` internally, but it takes and returns
    activations on their own scale. `save_model` folds the scale into the
    saved weights.
    """

    architecture: ClassVar[str]
    """Name in configs and the registry."""
    saved_architecture: ClassVar[str]
    """Architecture written to cfg.json; batchtopk is saved as jumprelu."""
    sparsity_coefficient: ClassVar[str]
    """Name of the config field that sets the sparsity of this architecture."""
    unit_norm_decoder: ClassVar[bool] = False
    """True where decoder rows are kept at unit norm during training."""
    default_decoder_init_norm: ClassVar[float] = 0.1

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        if cfg.architecture != self.architecture:
            raise ValueError(
                f"config architecture {cfg.architecture!r} does not match {type(self).__name__}"
            )
        self.cfg = cfg
        self.activation_norm_scale = 1.0
        generator = torch.Generator().manual_seed(cfg.seed)
        self._init_parameters(generator)
        self.to(device=cfg.device, dtype=cfg.torch_dtype)

    # construction ---------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: SAEConfig) -> SAE:
        """Build a seeded, initialized SAE of the architecture `cfg` names."""
        from saesweep.saes.registry import get_architecture

        arch_cls = get_architecture(cfg.architecture)
        if cls is not SAE and not issubclass(arch_cls, cls):
            raise ValueError(f"{cls.__name__}.from_config got architecture {cfg.architecture!r}")
        return arch_cls(cfg)

    def _init_parameters(self, generator: torch.Generator) -> None:
        """Decoder rows drawn uniformly and scaled to `decoder_init_norm`; the
        encoder starts as the decoder transpose and the biases at zero
        (Anthropic, "Circuits Updates - April 2024"; Gao et al. 2024)."""
        d_in, d_sae = self.cfg.d_in, self.cfg.d_sae
        bound = math.sqrt(6.0 / d_in)
        w_dec = (torch.rand(d_sae, d_in, generator=generator) * 2 - 1) * bound
        norm = self.cfg.decoder_init_norm
        if norm is None:
            norm = 1.0 if self.unit_norm_decoder else self.default_decoder_init_norm
        w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True) * norm
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.T.clone().contiguous())
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self._init_architecture_parameters()

    def _init_architecture_parameters(self) -> None:
        """Add the parameters specific to the architecture (b_enc by default)."""
        self.b_enc = nn.Parameter(torch.zeros(self.cfg.d_sae))

    # inference ------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    def activation_norm_scale_in_use(self) -> float:
        """Return the factor that inputs are multiplied by before encoding (1.0 without normalization)."""
        if self.cfg.normalize_activations == "expected_average_only_in":
            return self.activation_norm_scale
        return 1.0

    _scale = activation_norm_scale_in_use

    def process_sae_in(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] raw activations -> [..., d_in] encoder input (scaled, centred)."""
        x = x.to(self.dtype) * self._scale()
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x

    def hidden_pre(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] raw activations -> [..., d_sae] encoder pre-activations."""
        return self.process_sae_in(x) @ self.W_enc + self.b_enc

    def activation(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        """[..., d_sae] pre-activations -> [..., d_sae] inference latent activations."""
        return torch.relu(hidden_pre)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] activations -> [..., d_sae] latent activations."""
        return self.activation(self.hidden_pre(x))

    def decode_scaled(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """[..., d_sae] latents -> [..., d_in] reconstruction in the normalized space."""
        return feature_acts @ self.W_dec + self.b_dec

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """[..., d_sae] latent activations -> [..., d_in] reconstruction."""
        return self.decode_scaled(feature_acts) / self._scale()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] activations -> [..., d_in] reconstruction."""
        return self.decode(self.encode(x))

    # training -------------------------------------------------------------------

    def encode_for_training(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, d_in] -> (feature_acts [N, d_sae], hidden_pre [N, d_sae]) with the
        training-time activation (which differs from `encode` for batchtopk)."""
        hidden_pre = self.hidden_pre(x)
        return self.activation(hidden_pre), hidden_pre

    def encode_sparse_for_training(
        self, x: torch.Tensor
    ) -> tuple[SparseLatents, torch.Tensor, torch.Tensor] | None:
        """[N, d_in] -> (latents, feature_acts [N, d_sae], hidden_pre [N, d_sae])
        with the training-time activation, or None where the latents are not
        k-sparse (the default). `feature_acts` is detached, because the losses
        of a k-sparse architecture read the latents only through `latents`."""
        return None

    def training_loss(
        self,
        x: torch.Tensor,
        *,
        dead_mask: torch.Tensor | None = None,
        sparsity_scale: float = 1.0,
        sparse_decoder: bool = True,
    ) -> TrainingOutput:
        """Compute the training loss terms on `x` [..., d_in].

        The reconstruction loss is the squared error summed over d_in and
        averaged over tokens, in the normalized space. `dead_mask` [d_sae] marks
        latents that have not fired in the dead-latent window (used by AuxK and
        the jumprelu pre-activation loss). `sparsity_scale` multiplies the
        sparsity penalty (for warm-up). With `sparse_decoder`, architectures
        with k-sparse latents (topk, batchtopk) never multiply the dense
        [N, d_sae] latents by W_dec. The reconstruction reads only the selected
        latents' rows of W_dec, and AuxK only the dead latents' rows, in the
        forward and the backward pass. The loss and the gradients are the same
        up to float rounding. Other architectures ignore it.
        """
        x = x.reshape(-1, self.cfg.d_in).to(self.dtype)
        sparse = self.encode_sparse_for_training(x) if sparse_decoder else None
        if sparse is None:
            feature_acts, hidden_pre = self.encode_for_training(x)
            out_scaled = self.decode_scaled(feature_acts)
        else:
            latents, feature_acts, hidden_pre = sparse
            out_scaled = latents.decode(self.W_dec) + self.b_dec
        x_scaled = x * self._scale()
        losses = {"mse_loss": (out_scaled - x_scaled).pow(2).sum(dim=-1).mean()}
        losses.update(
            self.auxiliary_losses(
                x_scaled=x_scaled,
                out_scaled=out_scaled,
                feature_acts=feature_acts,
                hidden_pre=hidden_pre,
                dead_mask=dead_mask,
                sparsity_scale=sparsity_scale,
                sparse_decoder=sparse is not None,
            )
        )
        loss = torch.stack(list(losses.values())).sum()
        output = TrainingOutput(
            loss=loss,
            losses=losses,
            sae_in=x,
            sae_out=out_scaled / self._scale(),
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
        )
        self.after_training_forward(output)
        return output

    def auxiliary_losses(
        self,
        *,
        x_scaled: torch.Tensor,
        out_scaled: torch.Tensor,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        dead_mask: torch.Tensor | None,
        sparsity_scale: float,
        sparse_decoder: bool,
    ) -> dict[str, torch.Tensor]:
        """Architecture-specific loss terms (sparsity penalty, auxiliary losses).
        `sparse_decoder` is True when `encode_sparse_for_training` produced the
        latents, so `feature_acts` is detached."""
        raise NotImplementedError

    def after_training_forward(self, output: TrainingOutput) -> None:
        """Update training-only state from a forward pass (batchtopk threshold)."""

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the gradient component along each decoder row, so a step
        keeps the unit norm to first order (Gao et al. 2024). No-op unless the
        architecture keeps a unit-norm decoder."""
        if not self.unit_norm_decoder or self.W_dec.grad is None:
            return
        w_dec = self.W_dec.data
        unit = w_dec / w_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        parallel = (self.W_dec.grad * unit).sum(dim=-1, keepdim=True)
        self.W_dec.grad -= parallel * unit

    @torch.no_grad()
    def apply_decoder_constraint(self) -> None:
        """Renormalize decoder rows to unit norm where the architecture requires it."""
        if self.unit_norm_decoder:
            self.W_dec.data /= self.W_dec.data.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    # folding --------------------------------------------------------------------

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scale: float) -> None:
        """Fold an input scale into the weights, in place.

        Afterwards the SAE on x returns what it returned on scale * x, divided
        by scale, for every architecture: the encoder computes the same
        pre-activations and the decoder output shrinks by 1/scale.
        """
        self.W_enc.data *= scale
        self.W_dec.data /= scale
        self.b_dec.data /= scale

    def folded_copy(self) -> SAE:
        """Return a copy that works on raw activations with normalize_activations="none"."""
        folded = copy.deepcopy(self)
        folded.fold_activation_norm_scaling_factor(self._scale())
        folded.cfg = self.cfg.replace(normalize_activations="none")
        folded.activation_norm_scale = 1.0
        return folded

    # files ------------------------------------------------------------------------

    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        """Return the tensors that SAELens v6 stores for `saved_architecture`, unfolded."""
        return {name: tensor.detach() for name, tensor in self.state_dict().items()}

    @classmethod
    def parameter_names(cls, cfg_dict: dict[str, Any]) -> set[str]:
        """Tensor names a SAELens v6 file of this (saved) architecture contains."""
        return {"W_enc", "W_dec", "b_enc", "b_dec"}

    def load_inference_state_dict(self, tensors: dict[str, torch.Tensor], cfg_dict: dict[str, Any]) -> None:
        """Copy tensors read from a SAELens v6 file into the parameters."""
        self.load_state_dict(tensors, strict=True)

    def save_model(self, path: str | Path, sparsity: torch.Tensor | None = None) -> Path:
        """Write SAELens v6 files to the folder `path`; see `saesweep.saes.io`."""
        from saesweep.saes.io import save_sae

        return save_sae(self, path, sparsity=sparsity)

    @classmethod
    def load_from_disk(cls, path: str | Path, device: str | None = None, dtype: str | None = None) -> SAE:
        """Load an SAE from a folder with SAELens v6 files; `device` wins over cfg.json."""
        from saesweep.saes.io import load_sae

        return load_sae(path, device=device, dtype=dtype)

    @classmethod
    def from_pretrained(
        cls, release: str, sae_id: str, device: str = "cpu", dtype: str | None = None, **hub_kwargs: Any
    ) -> tuple[SAE, dict[str, Any], torch.Tensor | None]:
        """Load (sae, cfg_dict, log10 sparsity or None) from a Hub repo "user/repo"
        and a folder in it, or from a local folder `release` and subfolder `sae_id`."""
        from saesweep.saes.io import load_pretrained

        return load_pretrained(release, sae_id, device=device, dtype=dtype, **hub_kwargs)
