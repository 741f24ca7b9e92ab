"""BatchTopK SAE (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders")."""

from __future__ import annotations

from typing import Any

import torch

from saesweep.saes.base import SAE, SparseLatents, TrainingOutput
from saesweep.saes.registry import register_architecture
from saesweep.saes.topk import auxk_loss


def _batch_topk_flat(hidden_pre: torch.Tensor, k: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (values, positions) of the k * n_tokens largest ReLU activations
    of [..., d_sae], positions indexing the flattened tensor."""
    flat = torch.relu(hidden_pre).flatten()
    n_keep = min(flat.numel(), max(1, int(k * hidden_pre.shape[:-1].numel())))
    return torch.topk(flat, n_keep, sorted=False)


def batch_topk_activation(hidden_pre: torch.Tensor, k: float) -> torch.Tensor:
    """Keep the k * n_tokens largest ReLU activations of the whole [n_tokens, d_sae] batch."""
    values, positions = _batch_topk_flat(hidden_pre, k)
    flat = torch.zeros_like(hidden_pre).flatten().scatter(0, positions, values)
    return flat.reshape(hidden_pre.shape)


def batch_topk_latents(hidden_pre: torch.Tensor, k: float) -> tuple[SparseLatents, torch.Tensor]:
    """Select what `batch_topk_activation` keeps of [N, d_sae] and return it as
    (flat latents with per-token offsets, detached dense [N, d_sae] activations)."""
    n_tokens, d_sae = hidden_pre.shape
    values, positions = _batch_topk_flat(hidden_pre, k)
    # embedding_bag reads each token's latents as one contiguous run. A flat
    # position is token * d_sae + latent, so sorting positions groups them by token.
    positions, order = positions.sort()
    values = values[order]
    tokens = torch.div(positions, d_sae, rounding_mode="floor")
    counts = torch.bincount(tokens, minlength=n_tokens)
    latents = SparseLatents(indices=positions - tokens * d_sae, values=values, offsets=counts.cumsum(0) - counts)
    flat = torch.zeros_like(hidden_pre).flatten().scatter(0, positions, values.detach())
    return latents, flat.reshape(n_tokens, d_sae)


@register_architecture
class BatchTopKSAE(SAE):
    """k latents fire per token on average over a training batch. At inference
    a single threshold replaces the batch rule: the moving average of the
    smallest activation kept in each batch. Saved as a jumprelu SAE whose
    thresholds all equal that value, as SAELens does."""

    architecture = "batchtopk"
    saved_architecture = "jumprelu"
    sparsity_coefficient = "k"
    unit_norm_decoder = True

    def _init_architecture_parameters(self) -> None:
        super()._init_architecture_parameters()
        self.register_buffer("topk_threshold", torch.zeros(()))

    def activation(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(hidden_pre) * (hidden_pre > self.topk_threshold).to(hidden_pre.dtype)

    def encode_for_training(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_pre = self.hidden_pre(x)
        return batch_topk_activation(hidden_pre, self.cfg.k), hidden_pre

    def encode_sparse_for_training(
        self, x: torch.Tensor
    ) -> tuple[SparseLatents, torch.Tensor, torch.Tensor]:
        hidden_pre = self.hidden_pre(x)
        latents, feature_acts = batch_topk_latents(hidden_pre, self.cfg.k)
        return latents, feature_acts, hidden_pre

    def auxiliary_losses(
        self, *, x_scaled, out_scaled, hidden_pre, dead_mask, sparse_decoder, **_
    ) -> dict[str, torch.Tensor]:
        aux = auxk_loss(
            self,
            x_scaled=x_scaled,
            out_scaled=out_scaled,
            hidden_pre=hidden_pre,
            dead_mask=dead_mask,
            sparse_decoder=sparse_decoder,
        )
        return {"auxiliary_reconstruction_loss": aux}

    @torch.no_grad()
    def after_training_forward(self, output: TrainingOutput) -> None:
        positive = output.feature_acts[output.feature_acts > 0]
        if positive.numel():
            smallest = positive.min().to(self.topk_threshold.dtype)
            if float(self.topk_threshold) == 0.0:
                # The first batch sets the average instead of pulling it up from zero.
                self.topk_threshold.copy_(smallest)
            else:
                rate = self.cfg.topk_threshold_lr
                self.topk_threshold.mul_(1 - rate).add_(rate * smallest)
        output.metrics["topk_threshold"] = float(self.topk_threshold)

    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        state = super().inference_state_dict()
        threshold = state.pop("topk_threshold")
        state["threshold"] = torch.full_like(state["b_enc"], float(threshold))
        return state

    @classmethod
    def parameter_names(cls, cfg_dict: dict[str, Any]) -> set[str]:
        return {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}
