"""SAEs spliced into a TransformerLens model, and the CE loss and KL scores that follow.

Scores, defined as in SAELens 6.54 (``sae_lens/evals.py``, ``get_downstream_reconstruction_metrics``):

    ce_loss_score = (CE_zero_ablated - CE_spliced) / (CE_zero_ablated - CE_clean)
    kl_div_score  = (KL_zero_ablated - KL_spliced) / KL_zero_ablated

1.0 means the SAE loses nothing, and 0.0 means it is as bad as zero ablation. A score is NaN
when zero ablation leaves the model's output unchanged, since the ratio is then undefined.

- CE is the mean next-token cross-entropy, -log p(tokens[t + 1] | tokens[..t]).
- KL is the mean KL(clean || patched) between the next-token distributions of the clean and
  the patched model at the same position.
- Both average over the same predictions: position t counts when t and t + 1 are real tokens
  (``attention_mask`` 1 at both), so no prediction reads from or targets padding. SAELens also
  averages KL over the last position, which predicts no token in the batch.
- "spliced" replaces the hookpoint's activation with the SAE's reconstruction, "zero ablated"
  with zeros and "mean ablated" with the mean activation over the replaced positions of the
  batch.
- ``splice_mask`` ([batch, pos] bool) chooses the replaced positions, for the SAE and both
  ablations alike, and the others keep the clean activation. The evaluation server passes the
  positions that SAE trainers are served (``TokenBatch.keep``: no padding, BOS, separator or
  first position), so an SAE is never scored where it was not trained. SAELens 6.54 keeps
  special-token positions clean in the spliced run (``run_evals(exclude_special_tokens=True)``),
  but zero-ablates every position.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from saesweep.evaluation.spliced_model import SplicedModel, model_hook_point, sae_hook_name
from saesweep.saes import SAE

HookFn = Callable[..., torch.Tensor]

PREDICTIONS_KEY = "ce_eval_predictions"
"""Key of the number of predictions that the losses of :func:`spliced_losses` average over."""


def _replacement_hook(replace: Callable[[torch.Tensor], torch.Tensor], splice_mask: torch.Tensor | None = None) -> HookFn:
    """Build a hook that replaces the activation with `replace(activation)` where `splice_mask` is True."""

    def hook(activation: torch.Tensor, *, hook: Any) -> torch.Tensor:
        replaced = replace(activation).to(activation.dtype)
        if splice_mask is None:
            return replaced
        mask = splice_mask.to(activation.device).reshape(*splice_mask.shape, *([1] * (activation.dim() - 2)))
        return torch.where(mask, replaced, activation)

    return hook


def sae_hooks(saes: Sequence[SAE]) -> list[tuple[str, HookFn]]:
    """Build forward hooks that replace each SAE's hookpoint (`sae.cfg.hook_name`) with its reconstruction."""
    hooks = []
    for sae in saes:
        hooks.append((sae_hook_name(sae), _replacement_hook(lambda x, sae=sae: sae(x.to(sae.dtype)))))
    return hooks


@contextmanager
def spliced(model: Any, saes: Sequence[SAE]) -> Iterator[Any]:
    """Run `model` with every SAE in `saes` spliced in; the SAEs are removed on exit."""
    with SplicedModel(model).saes(saes):
        yield model


@torch.no_grad()
def run_with_saes(
    model: Any,
    tokens: torch.Tensor,
    saes: Sequence[SAE],
    *,
    splice_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return the logits [batch, pos, d_vocab] of `model` on `tokens` with `saes` spliced in
    at the True positions of `splice_mask` (every position when None)."""
    return SplicedModel(model).run_with_saes(
        tokens, saes=saes, splice_mask=splice_mask, return_type="logits", **_forward_options(attention_mask)
    )


def prediction_mask(tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Return the [batch, pos - 1] bool mask of the next-token predictions that count:
    position t counts when t and t + 1 are both real tokens."""
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [batch, pos] with pos >= 2, got shape {tuple(tokens.shape)}.")
    if attention_mask is None:
        return torch.ones(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.bool, device=tokens.device)
    _check_mask_shape("attention_mask", attention_mask, tokens)
    real = attention_mask.to(device=tokens.device, dtype=torch.bool)
    return real[:, :-1] & real[:, 1:]


def next_token_ce(
    logits: torch.Tensor, tokens: torch.Tensor, predictions: torch.Tensor | None = None
) -> torch.Tensor:
    """Return the mean cross-entropy of predicting tokens[:, 1:] from logits[:, :-1], over the
    True entries of `predictions` ([batch, pos - 1], see `prediction_mask`) or all of them."""
    per_prediction = _per_prediction_ce(logits, tokens)
    return _masked_mean(per_prediction, predictions)


def mean_kl(
    clean_logits: torch.Tensor, patched_logits: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Return the mean of KL(clean || patched) of the next-token distributions over the True
    entries of `positions` ([batch, pos] of the logits given), or over every position."""
    return _masked_mean(_per_position_kl(clean_logits, patched_logits), positions)


def _per_prediction_ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    predicted = logits[:, :-1].float()
    targets = tokens[:, 1:].to(predicted.device)
    ce = F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), targets.reshape(-1), reduction="none")
    return ce.view(targets.shape)


def _per_position_kl(clean_logits: torch.Tensor, patched_logits: torch.Tensor) -> torch.Tensor:
    clean = F.log_softmax(clean_logits.float(), dim=-1)
    patched = F.log_softmax(patched_logits.float(), dim=-1)
    return (clean.exp() * (clean - patched)).sum(dim=-1)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    return values[mask.to(values.device)].mean()


def _check_mask_shape(name: str, mask: torch.Tensor, tokens: torch.Tensor) -> None:
    if tuple(mask.shape) != tuple(tokens.shape):
        raise ValueError(
            f"{name} has shape {tuple(mask.shape)}, but tokens have shape {tuple(tokens.shape)}. "
            f"Pass one {name} entry per token."
        )


def _forward_options(attention_mask: torch.Tensor | None) -> dict[str, Any]:
    return {} if attention_mask is None else {"attention_mask": attention_mask}


@torch.no_grad()
def spliced_losses(
    model: Any,
    sae: SAE,
    tokens: torch.Tensor,
    *,
    splice_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, float]:
    """Compute the CE losses and KL divergences of `model` on `tokens` [batch, pos].

    Four runs: clean, with `sae` spliced in, and with its hookpoint zero- and mean-ablated, each
    at the True positions of `splice_mask` (every position when None). `attention_mask` marks
    real tokens (1) and padding (0); the model reads it, and the losses leave out predictions
    that read from or target padding. The result also contains `ce_eval_predictions`, the number
    of predictions averaged over.
    """
    predictions = prediction_mask(tokens, attention_mask)
    n_predictions = int(predictions.sum())
    if n_predictions == 0:
        raise ValueError(
            "attention_mask leaves no prediction to score: no two neighbouring positions are real "
            "tokens. Pass windows with at least two real tokens."
        )
    if splice_mask is not None:
        _check_mask_shape("splice_mask", splice_mask, tokens)
        splice_mask = splice_mask.to(device=tokens.device, dtype=torch.bool)
        if not splice_mask.any():
            raise ValueError("splice_mask selects no position, so nothing would be replaced. Pass a mask with True entries.")

    hook_name = sae_hook_name(sae)
    model_hook_point(model, hook_name)
    options = {"return_type": "logits", **_forward_options(attention_mask)}
    clean = model(tokens, **options)
    with_sae = SplicedModel(model).run_with_saes(tokens, saes=[sae], splice_mask=splice_mask, **options)

    zero_hook = _replacement_hook(torch.zeros_like, splice_mask)
    with model.hooks(fwd_hooks=[(hook_name, zero_hook)]):
        zero = model(tokens, **options)

    def mean_over_replaced(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        chosen = flat[splice_mask.to(x.device)] if splice_mask is not None else flat.reshape(-1, flat.shape[-1])
        return chosen.mean(dim=0).reshape(x.shape[2:]).expand_as(x)

    with model.hooks(fwd_hooks=[(hook_name, _replacement_hook(mean_over_replaced, splice_mask))]):
        mean = model(tokens, **options)

    def ce(logits: torch.Tensor) -> float:
        return float(next_token_ce(logits, tokens, predictions))

    def kl(patched: torch.Tensor) -> float:
        return float(mean_kl(clean[:, :-1], patched[:, :-1], predictions))

    return {
        "ce_loss_clean": ce(clean),
        "ce_loss_spliced": ce(with_sae),
        "ce_loss_zero_ablated": ce(zero),
        "ce_loss_mean_ablated": ce(mean),
        "kl_div_spliced": kl(with_sae),
        "kl_div_zero_ablated": kl(zero),
        PREDICTIONS_KEY: float(n_predictions),
    }


def merge_losses(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """Combine the `spliced_losses` of several batches into the means over all their predictions."""
    if not parts:
        raise ValueError("merge_losses needs the losses of at least one batch.")
    total = sum(part[PREDICTIONS_KEY] for part in parts)
    merged = {
        key: sum(part[key] * part[PREDICTIONS_KEY] for part in parts) / total
        for key in parts[0]
        if key != PREDICTIONS_KEY
    }
    merged[PREDICTIONS_KEY] = total
    return merged


def with_scores(losses: dict[str, float]) -> dict[str, float]:
    """Return `losses` plus ce_loss_score and kl_div_score computed from them."""
    ce_gap = losses["ce_loss_zero_ablated"] - losses["ce_loss_clean"]
    kl_zero = losses["kl_div_zero_ablated"]
    nan = float("nan")
    return {
        **losses,
        "ce_loss_score": (losses["ce_loss_zero_ablated"] - losses["ce_loss_spliced"]) / ce_gap if ce_gap else nan,
        "kl_div_score": (kl_zero - losses["kl_div_spliced"]) / kl_zero if kl_zero else nan,
    }


def spliced_scores(
    model: Any,
    sae: SAE,
    tokens: torch.Tensor,
    *,
    splice_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, float]:
    """Compute `spliced_losses` on `tokens` and the scores that follow from them."""
    return with_scores(spliced_losses(model, sae, tokens, splice_mask=splice_mask, attention_mask=attention_mask))
