"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders")."""

from __future__ import annotations

from typing import Any

import torch

from saesweep.saes.base import SAE, SparseLatents
from saesweep.saes.registry import register_architecture


def topk_latents(hidden_pre: torch.Tensor, k: int) -> SparseLatents:
    """Select the k largest entries of each row of [..., d_sae] and apply ReLU
    to them. Exactly k entries are selected even when values tie."""
    values, indices = torch.topk(hidden_pre, k, dim=-1, sorted=False)
    return SparseLatents(indices=indices, values=torch.relu(values))


def topk_activation(hidden_pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest entries of each row of [..., d_sae] (ReLU applied),
    zero the rest. Exactly k entries are kept even when values tie."""
    latents = topk_latents(hidden_pre, k)
    return torch.zeros_like(hidden_pre).scatter(-1, latents.indices, latents.values)


def auxk_loss(
    sae: SAE,
    *,
    x_scaled: torch.Tensor,
    out_scaled: torch.Tensor,
    hidden_pre: torch.Tensor,
    dead_mask: torch.Tensor | None,
    sparse_decoder: bool = False,
) -> torch.Tensor:
    """AuxK loss of Gao et al. 2024 (appendix A.2): the top k_aux dead latents
    reconstruct the residual e = x - x_hat, and the squared error is divided by
    the variance of e, then scaled by min(1, n_dead / k_aux). With
    `sparse_decoder` the selection and the reconstruction read only the dead
    latents' columns of `hidden_pre` and rows of W_dec."""
    if dead_mask is None:
        return hidden_pre.new_zeros(())
    n_dead = int(dead_mask.sum())
    if n_dead == 0:
        return hidden_pre.new_zeros(())
    k_aux = sae.cfg.aux_k or sae.cfg.d_in // 2
    scale = min(1.0, n_dead / k_aux)
    k_aux = min(k_aux, n_dead)
    residual = (x_scaled - out_scaled).detach()
    if sparse_decoder:
        # A matmul over the dead columns alone gives the same sum, at a cost that
        # scales with n_dead instead of d_sae. An embedding_bag over the k_aux
        # selected rows was slower on a 2-core x86 CPU (d_in 576, 1024 tokens,
        # k_aux 288) unless n_dead exceeded about 10 * k_aux.
        dead = dead_mask.nonzero().squeeze(-1)
        aux_acts = topk_activation(hidden_pre.index_select(-1, dead), k_aux)
        residual_hat = aux_acts @ sae.W_dec.index_select(0, dead)
    else:
        dead_pre = torch.where(dead_mask, hidden_pre, torch.full_like(hidden_pre, -torch.inf))
        residual_hat = topk_activation(dead_pre, k_aux) @ sae.W_dec
    error = (residual_hat - residual).pow(2).sum()
    variance = (residual - residual.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
    loss = sae.cfg.aux_k_coefficient * scale * error / variance
    return torch.nan_to_num(loss, nan=0.0)


@register_architecture
class TopKSAE(SAE):
    """Exactly k latents fire per token; decoder rows are kept at unit norm and
    the AuxK loss revives dead latents."""

    architecture = "topk"
    saved_architecture = "topk"
    sparsity_coefficient = "k"
    unit_norm_decoder = True

    def activation(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        return topk_activation(hidden_pre, self.cfg.k)

    def encode_sparse_for_training(
        self, x: torch.Tensor
    ) -> tuple[SparseLatents, torch.Tensor, torch.Tensor]:
        hidden_pre = self.hidden_pre(x)
        latents = topk_latents(hidden_pre, self.cfg.k)
        feature_acts = torch.zeros_like(hidden_pre).scatter(-1, latents.indices, latents.values.detach())
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

    def load_inference_state_dict(self, tensors: dict[str, torch.Tensor], cfg_dict: dict[str, Any]) -> None:
        # SAELens topk files may request dividing latents by the decoder norm at
        # run time. Folding the norms into W_enc, b_enc and W_dec gives the same
        # outputs with plain topk.
        if cfg_dict.get("rescale_acts_by_decoder_norm"):
            tensors = dict(tensors)
            norms = tensors["W_dec"].norm(dim=-1).clamp_min(1e-8)
            tensors["W_dec"] = tensors["W_dec"] / norms[:, None]
            tensors["W_enc"] = tensors["W_enc"] * norms[None, :]
            tensors["b_enc"] = tensors["b_enc"] * norms
        super().load_inference_state_dict(tensors, cfg_dict)
