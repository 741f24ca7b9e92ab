"""SAEs spliced into the embedded model: CE loss and KL scores, and a clean model afterwards."""

from __future__ import annotations

import pytest
import torch

from saesweep import SAE, SAEConfig
from saesweep.activations.models import load_model
from saesweep.evaluation.splice import next_token_ce, run_with_saes, spliced_scores

HOOK = "blocks.4.hook_resid_pre"
D_MODEL = 576


@pytest.fixture(scope="module")
def model_and_tokens():
    model, tokenizer = load_model("smollm2-135m")
    text = [
        "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
        "Now is the winter of our discontent made glorious summer by this sun of York.",
    ]
    encoded = tokenizer(text, return_tensors="pt", padding="max_length", max_length=20, truncation=True)
    return model, encoded["input_ids"]


def identity_sae() -> SAE:
    """relu(x) - relu(-x) = x: a standard SAE with d_sae = 2 * d_in that reconstructs exactly."""
    sae = SAE.from_config(SAEConfig(architecture="standard", d_in=D_MODEL, d_sae=2 * D_MODEL, hook_name=HOOK))
    eye = torch.eye(D_MODEL)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def zero_sae() -> SAE:
    sae = SAE.from_config(SAEConfig(architecture="standard", d_in=D_MODEL, d_sae=64, hook_name=HOOK))
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.zero_()
    return sae


def test_identity_sae_scores_one(model_and_tokens):
    model, tokens = model_and_tokens
    scores = spliced_scores(model, identity_sae(), tokens)
    assert scores["ce_loss_score"] == pytest.approx(1.0, abs=1e-3)
    assert scores["kl_div_score"] == pytest.approx(1.0, abs=1e-3)
    assert scores["ce_loss_zero_ablated"] > scores["ce_loss_clean"]


def test_zero_output_sae_scores_zero(model_and_tokens):
    model, tokens = model_and_tokens
    scores = spliced_scores(model, zero_sae(), tokens)
    assert scores["ce_loss_score"] == pytest.approx(0.0, abs=1e-6)
    assert scores["kl_div_score"] == pytest.approx(0.0, abs=1e-6)


def test_spliced_ce_matches_hand_hooks(model_and_tokens):
    model, tokens = model_and_tokens
    sae = SAE.from_config(SAEConfig(architecture="topk", d_in=D_MODEL, d_sae=1152, k=64, hook_name=HOOK, seed=3))
    scores = spliced_scores(model, sae, tokens)

    def replace(activation, hook):
        return sae(activation)

    with torch.no_grad():
        logits = model.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(HOOK, replace)])
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    by_hand = -log_probs.gather(-1, tokens[:, 1:, None]).squeeze(-1).mean()
    assert scores["ce_loss_spliced"] == pytest.approx(float(by_hand), rel=1e-5)


def test_splicing_leaves_model_clean(model_and_tokens):
    model, tokens = model_and_tokens
    with torch.no_grad():
        before = model(tokens, return_type="logits")
        spliced_logits = run_with_saes(model, tokens, [zero_sae()])
        after = model(tokens, return_type="logits")
    torch.testing.assert_close(after, before)
    assert float(next_token_ce(spliced_logits, tokens)) != pytest.approx(float(next_token_ce(before, tokens)))
