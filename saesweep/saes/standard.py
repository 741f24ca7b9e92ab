"""Standard SAE: ReLU latents and an Lp penalty weighted by decoder row norm."""

from __future__ import annotations

import torch

from saesweep.saes.base import SAE
from saesweep.saes.registry import register_architecture


@register_architecture
class StandardSAE(SAE):
    """ReLU SAE trained with the sparsity penalty sum_i |f_i| * ||W_dec[i]||
    (Anthropic, "Circuits Updates - April 2024"); weighting by the decoder
    norm makes the penalty invariant to rescaling a latent, so the decoder
    needs no norm constraint."""

    architecture = "standard"
    saved_architecture = "standard"
    sparsity_coefficient = "l1_coefficient"

    def auxiliary_losses(self, *, feature_acts, sparsity_scale, **_) -> dict[str, torch.Tensor]:
        weighted = feature_acts * self.W_dec.norm(dim=-1)
        penalty = weighted.norm(p=self.cfg.lp_norm, dim=-1).mean()
        return {"l1_loss": sparsity_scale * self.cfg.l1_coefficient * penalty}
