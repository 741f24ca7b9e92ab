"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated SAEs")."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from saesweep.saes.base import SAE
from saesweep.saes.registry import register_architecture


@register_architecture
class GatedSAE(SAE):
    """A gate path decides which latents fire and a magnitude path, sharing the
    encoder directions rescaled by exp(r_mag), decides how strongly:

        f(x) = 1[pi_gate > 0] * relu(pi_mag)
        pi_gate = x' W_enc + b_gate,   pi_mag = x' (W_enc * exp(r_mag)) + b_mag

    The L1 penalty acts on relu(pi_gate). An auxiliary loss reconstructs x from
    relu(pi_gate) through a frozen copy of the decoder, so the gate gets a
    gradient. Decoder rows are kept at unit norm as in the paper: with a free
    decoder norm the magnitude path (exp(r_mag)) lets training shrink the
    decoder and escape the penalty.
    """

    architecture = "gated"
    saved_architecture = "gated"
    sparsity_coefficient = "l1_coefficient"
    unit_norm_decoder = True

    def _init_architecture_parameters(self) -> None:
        d_sae = self.cfg.d_sae
        self.b_gate = nn.Parameter(torch.zeros(d_sae))
        self.b_mag = nn.Parameter(torch.zeros(d_sae))
        self.r_mag = nn.Parameter(torch.zeros(d_sae))

    def _paths(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sae_in = self.process_sae_in(x)
        projected = sae_in @ self.W_enc
        gate_pre = projected + self.b_gate
        magnitude_pre = projected * self.r_mag.exp() + self.b_mag
        return gate_pre, magnitude_pre

    def hidden_pre(self, x: torch.Tensor) -> torch.Tensor:
        """Return the magnitude-path pre-activations [..., d_sae]."""
        return self._paths(x)[1]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        gate_pre, magnitude_pre = self._paths(x)
        return (gate_pre > 0).to(magnitude_pre.dtype) * torch.relu(magnitude_pre)

    def encode_for_training(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate_pre, magnitude_pre = self._paths(x)
        self._gate_pre = gate_pre
        feature_acts = (gate_pre > 0).to(magnitude_pre.dtype) * torch.relu(magnitude_pre)
        return feature_acts, magnitude_pre

    def auxiliary_losses(self, *, x_scaled, sparsity_scale, **_) -> dict[str, torch.Tensor]:
        gate_acts = torch.relu(self._gate_pre)
        del self._gate_pre
        penalty = (gate_acts * self.W_dec.norm(dim=-1)).sum(dim=-1).mean()
        via_gate = gate_acts @ self.W_dec.detach() + self.b_dec.detach()
        aux = (via_gate - x_scaled).pow(2).sum(dim=-1).mean()
        return {
            "l1_loss": sparsity_scale * self.cfg.l1_coefficient * penalty,
            "auxiliary_reconstruction_loss": aux,
        }

    @classmethod
    def parameter_names(cls, cfg_dict: dict[str, Any]) -> set[str]:
        return {"W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag"}
