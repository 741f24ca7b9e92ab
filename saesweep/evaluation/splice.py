"""SAEs spliced into a TransformerLens model, and the CE loss and KL scores that follow.

Scores, defined as in SAELens 6.54 (sae_lens/evals.py):

    ce_loss_score = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean)
    kl_div_score  = (KL_ablated - KL_spliced) / KL_ablated

where CE is the mean next-token cross-entropy, KL is the mean per-token
KL(clean || patched) of the next-token distributions, and "ablated" replaces
the hookpoint's activations with zeros (or with their mean over the batch's
tokens). 1.0 means the SAE loses nothing; 0.0 means it is as bad as ablation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from saesweep.saes import SAE

HookFn = Callable[..., torch.Tensor]


def _replacement_hook(replace: Callable[[torch.Tensor], torch.Tensor]) -> HookFn:
    def hook(activation: torch.Tensor, *, hook: Any) -> torch.Tensor:
        return replace(activation).to(activation.dtype)

    return hook


def sae_hooks(saes: Sequence[SAE]) -> list[tuple[str, HookFn]]:
    """Build forward hooks that replace each SAE's hookpoint (`sae.cfg.hook_name`) with its reconstruction."""
    hooks = []
    for sae in saes:
        if not sae.cfg.hook_name:
            raise ValueError("an SAE to splice needs cfg.hook_name, the hookpoint it reconstructs")
        hooks.append((sae.cfg.hook_name, _replacement_hook(lambda x, sae=sae: sae(x.to(sae.dtype)))))
    return hooks


@contextmanager
def spliced(model: Any, saes: Sequence[SAE]) -> Iterator[Any]:
    """Run `model` with every SAE in `saes` spliced in; the hooks are removed on exit."""
    with model.hooks(fwd_hooks=sae_hooks(saes)):
        yield model


@torch.no_grad()
def run_with_saes(model: Any, tokens: torch.Tensor, saes: Sequence[SAE]) -> torch.Tensor:
    """Return the logits [batch, pos, d_vocab] of `model` on `tokens` with `saes` spliced in."""
    with spliced(model, saes):
        return model(tokens, return_type="logits")


def next_token_ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Return the mean cross-entropy of predicting tokens[:, 1:] from logits[:, :-1]."""
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return -log_probs.gather(-1, tokens[:, 1:, None]).mean()


def mean_kl(clean_logits: torch.Tensor, patched_logits: torch.Tensor) -> torch.Tensor:
    """Return the mean over tokens of KL(clean || patched) of the next-token distributions."""
    clean = F.log_softmax(clean_logits.float(), dim=-1)
    patched = F.log_softmax(patched_logits.float(), dim=-1)
    return (clean.exp() * (clean - patched)).sum(dim=-1).mean()


@torch.no_grad()
def spliced_losses(model: Any, sae: SAE, tokens: torch.Tensor) -> dict[str, float]:
    """Compute the CE losses and KL divergences of `model` on `tokens` [batch, pos].

    Four runs: clean, with `sae` spliced in, and with its hookpoint zero- and
    mean-ablated.
    """
    hook_name = sae.cfg.hook_name
    clean = model(tokens, return_type="logits")
    with spliced(model, [sae]):
        with_sae = model(tokens, return_type="logits")
    with model.hooks(fwd_hooks=[(hook_name, _replacement_hook(torch.zeros_like))]):
        zero = model(tokens, return_type="logits")

    def mean_over_tokens(x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=tuple(range(x.dim() - 1)), keepdim=True).expand_as(x)

    with model.hooks(fwd_hooks=[(hook_name, _replacement_hook(mean_over_tokens))]):
        mean = model(tokens, return_type="logits")

    return {
        "ce_loss_clean": float(next_token_ce(clean, tokens)),
        "ce_loss_spliced": float(next_token_ce(with_sae, tokens)),
        "ce_loss_zero_ablated": float(next_token_ce(zero, tokens)),
        "ce_loss_mean_ablated": float(next_token_ce(mean, tokens)),
        "kl_div_spliced": float(mean_kl(clean, with_sae)),
        "kl_div_zero_ablated": float(mean_kl(clean, zero)),
    }


def with_scores(losses: dict[str, float]) -> dict[str, float]:
    """Return `losses` plus ce_loss_score and kl_div_score computed from them."""
    ce_gap = losses["ce_loss_zero_ablated"] - losses["ce_loss_clean"]
    kl_zero = losses["kl_div_zero_ablated"]
    return {
        **losses,
        "ce_loss_score": (losses["ce_loss_zero_ablated"] - losses["ce_loss_spliced"]) / ce_gap,
        "kl_div_score": (kl_zero - losses["kl_div_spliced"]) / kl_zero,
    }


def spliced_scores(model: Any, sae: SAE, tokens: torch.Tensor) -> dict[str, float]:
    """Compute `spliced_losses` on `tokens` and the scores that follow from them."""
    return with_scores(spliced_losses(model, sae, tokens))
