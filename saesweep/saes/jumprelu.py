"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead: Improving
Reconstruction Fidelity with JumpReLU Sparse Autoencoders")."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from saesweep.saes.base import SAE
from saesweep.saes.registry import register_architecture


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    """Return the rectangle kernel K(u): 1 where |u| < 1/2, else 0."""
    return (u.abs() < 0.5).to(u.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """z * 1[z > theta] with the straight-through estimator of the paper (eq. 11):
    d/dtheta = -(theta / eps) K((z - theta) / eps); d/dz = 1[z > theta]."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = (z > theta).to(z.dtype) * grad_output
        kernel = _rectangle((z - theta) / eps) / eps
        grad_theta = (-(theta * kernel) * grad_output).reshape(-1, theta.shape[-1]).sum(dim=0)
        return grad_z, grad_theta, None


class StepFunction(torch.autograd.Function):
    """H(z - theta) with the straight-through estimator of the paper (eq. 12):
    d/dtheta = -(1 / eps) K((z - theta) / eps); no gradient to z."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        kernel = _rectangle((z - theta) / eps) / eps
        grad_theta = (-kernel * grad_output).reshape(-1, theta.shape[-1]).sum(dim=0)
        return None, grad_theta, None


@register_architecture
class JumpReLUSAE(SAE):
    """Latents fire when their pre-activation exceeds a learned per-latent
    threshold. Trained with an L0 penalty whose gradient reaches the threshold
    through a kernel (straight-through) estimate with bandwidth
    `jumprelu_bandwidth`. Decoder rows are kept at unit norm as in the paper.
    The optional pre-activation loss (Anthropic, "Circuits Updates - January
    2025") pulls dead latents' pre-activations up towards their thresholds.
    """

    architecture = "jumprelu"
    saved_architecture = "jumprelu"
    sparsity_coefficient = "l0_coefficient"
    unit_norm_decoder = True

    def _init_architecture_parameters(self) -> None:
        super()._init_architecture_parameters()
        self.threshold = nn.Parameter(torch.full((self.cfg.d_sae,), float(self.cfg.jumprelu_init_threshold)))

    def activation(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(hidden_pre) * (hidden_pre > self.threshold).to(hidden_pre.dtype)

    def encode_for_training(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            self.threshold.data.clamp_(min=0.0)
        hidden_pre = self.hidden_pre(x)
        feature_acts = JumpReLUFunction.apply(hidden_pre, self.threshold, self.cfg.jumprelu_bandwidth)
        return feature_acts, hidden_pre

    def auxiliary_losses(self, *, hidden_pre, dead_mask, sparsity_scale, **_) -> dict[str, torch.Tensor]:
        l0 = StepFunction.apply(hidden_pre, self.threshold, self.cfg.jumprelu_bandwidth).sum(dim=-1).mean()
        losses = {"l0_loss": sparsity_scale * self.cfg.l0_coefficient * l0}
        if self.cfg.pre_act_loss_coefficient is not None:
            losses["pre_act_loss"] = self._pre_act_loss(hidden_pre, dead_mask)
        return losses

    def _pre_act_loss(self, hidden_pre: torch.Tensor, dead_mask: torch.Tensor | None) -> torch.Tensor:
        """sum over dead latents of relu(theta - z) * ||W_dec[i]||, averaged over tokens."""
        if dead_mask is None or not bool(dead_mask.any()):
            return hidden_pre.new_zeros(())
        gap = torch.relu(self.threshold - hidden_pre) * self.W_dec.norm(dim=-1)
        per_token = (gap * dead_mask.to(gap.dtype)).sum(dim=-1)
        return self.cfg.pre_act_loss_coefficient * per_token.mean()

    @classmethod
    def parameter_names(cls, cfg_dict: dict[str, Any]) -> set[str]:
        return {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}
