"""BatchTopK SAE (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders")."""

from __future__ import annotations

from typing import Any

import torch

from saesweep.saes.base import SAE, TrainingOutput
from saesweep.saes.registry import register_architecture
from saesweep.saes.topk import auxk_loss


def batch_topk_activation(hidden_pre: torch.Tensor, k: float) -> torch.Tensor:
    """Keep the k * n_tokens largest ReLU activations of the whole [n_tokens, d_sae] batch."""
    acts = torch.relu(hidden_pre)
    flat = acts.flatten()
    n_keep = min(flat.numel(), max(1, int(k * acts.shape[:-1].numel())))
    values, indices = torch.topk(flat, n_keep, sorted=False)
    return torch.zeros_like(flat).scatter(-1, indices, values).reshape(acts.shape)


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

    def auxiliary_losses(
        self, *, x_scaled, out_scaled, hidden_pre, dead_mask, **_
    ) -> dict[str, torch.Tensor]:
        aux = auxk_loss(self, x_scaled=x_scaled, out_scaled=out_scaled, hidden_pre=hidden_pre, dead_mask=dead_mask)
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
