"""SAEs spliced into the embedded model: CE loss and KL scores, SplicedModel, and a clean model afterwards."""

from __future__ import annotations

import pytest
import torch

from saesweep import SAE, SAEConfig, SplicedModel
from saesweep.activations.models import load_model, model_info, run_hookpoints
from saesweep.activations.tokens import TokenStream
from saesweep.evaluation.splice import (
    merge_losses,
    next_token_ce,
    prediction_mask,
    run_with_saes,
    spliced_scores,
    with_scores,
)
from saesweep.training.trainer import SAETrainer, TrainerConfig

MODEL = "smollm2-135m"
HOOK = "blocks.4.hook_resid_pre"
SECOND_HOOK = "blocks.6.hook_resid_post"
QUICKSTART_HOOK = "blocks.5.hook_resid_pre"
D_MODEL = 576
SAE_HOOKS = ("hook_sae_input", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error", "hook_sae_output")


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return load_model(MODEL)


@pytest.fixture(scope="module")
def model_and_tokens(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    text = [
        "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
        "Now is the winter of our discontent made glorious summer by this sun of York.",
    ]
    encoded = tokenizer(text, return_tensors="pt", padding="max_length", max_length=20, truncation=True)
    return model, encoded["input_ids"]


@pytest.fixture(scope="module")
def padded_batch(model_and_tokenizer):
    """Right-padded tokens of two lines of different length, with their attention mask and a
    splice mask that leaves out padding and the first position, as the servers do."""
    model, tokenizer = model_and_tokenizer
    encoded = tokenizer(
        ["To be, or not to be, that is the question.", "Friends, Romans, countrymen"],
        return_tensors="pt",
        padding=True,
    )
    attention_mask = encoded["attention_mask"]
    assert tokenizer.padding_side == "right"
    assert attention_mask[1].sum() < attention_mask.shape[1], "the second line must be padded"
    splice_mask = attention_mask.bool().clone()
    splice_mask[:, 0] = False
    return model, encoded["input_ids"], attention_mask, splice_mask


def identity_sae(hook_name: str = HOOK) -> SAE:
    """relu(x) - relu(-x) = x: a standard SAE with d_sae = 2 * d_in that reconstructs exactly."""
    sae = SAE.from_config(SAEConfig(architecture="standard", d_in=D_MODEL, d_sae=2 * D_MODEL, hook_name=hook_name))
    eye = torch.eye(D_MODEL)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def zero_sae(hook_name: str = HOOK) -> SAE:
    sae = SAE.from_config(SAEConfig(architecture="standard", d_in=D_MODEL, d_sae=64, hook_name=hook_name))
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.zero_()
    return sae


def random_topk_sae(hook_name: str = HOOK, seed: int = 3) -> SAE:
    return SAE.from_config(
        SAEConfig(architecture="topk", d_in=D_MODEL, d_sae=1152, k=64, hook_name=hook_name, seed=seed)
    )


def logits_of(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, return_type="logits")


def hand_ce(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return float(-log_probs.gather(-1, tokens[:, 1:, None]).squeeze(-1).mean())


# Scores ---------------------------------------------------------------------------------------


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


def test_identity_sae_scores_one_with_masks(padded_batch):
    model, tokens, attention_mask, splice_mask = padded_batch
    scores = spliced_scores(model, identity_sae(), tokens, splice_mask=splice_mask, attention_mask=attention_mask)
    assert scores["ce_loss_score"] == pytest.approx(1.0, abs=1e-3)
    assert scores["kl_div_score"] == pytest.approx(1.0, abs=1e-3)
    assert scores["ce_loss_zero_ablated"] > scores["ce_loss_clean"]


def test_zero_output_sae_scores_zero_with_masks(padded_batch):
    # Zero ablation replaces the same positions as the SAE, so an SAE that outputs zeros is
    # exactly as bad as the ablation.
    model, tokens, attention_mask, splice_mask = padded_batch
    scores = spliced_scores(model, zero_sae(), tokens, splice_mask=splice_mask, attention_mask=attention_mask)
    assert scores["ce_loss_score"] == pytest.approx(0.0, abs=1e-6)
    assert scores["kl_div_score"] == pytest.approx(0.0, abs=1e-6)


def test_losses_skip_padding_predictions(padded_batch):
    model, tokens, attention_mask, splice_mask = padded_batch
    scores = spliced_scores(model, identity_sae(), tokens, splice_mask=splice_mask, attention_mask=attention_mask)
    real_lengths = attention_mask.sum(dim=1)
    assert scores["ce_eval_predictions"] == float((real_lengths - 1).sum())

    with torch.no_grad():
        logits = model(tokens, attention_mask=attention_mask, return_type="logits")
    rows = [hand_ce(logits[i : i + 1, : int(n)], tokens[i : i + 1, : int(n)]) for i, n in enumerate(real_lengths)]
    weights = (real_lengths - 1).tolist()
    by_hand = sum(ce * w for ce, w in zip(rows, weights)) / sum(weights)
    assert scores["ce_loss_clean"] == pytest.approx(by_hand, rel=1e-5)


def test_prediction_mask_needs_both_positions_real():
    tokens = torch.zeros(2, 4, dtype=torch.long)
    attention_mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    expected = torch.tensor([[True, True, False], [False, True, True]])
    assert torch.equal(prediction_mask(tokens, attention_mask), expected)


def test_spliced_ce_matches_hand_hooks(model_and_tokens):
    model, tokens = model_and_tokens
    sae = random_topk_sae()
    scores = spliced_scores(model, sae, tokens)

    def replace(activation, hook):
        return sae(activation)

    with torch.no_grad():
        logits = model.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(HOOK, replace)])
    assert scores["ce_loss_spliced"] == pytest.approx(hand_ce(logits, tokens), rel=1e-5)


def test_merge_losses_weights_by_predictions():
    first = {"ce_loss_clean": 1.0, "kl_div_spliced": 0.0, "ce_eval_predictions": 1.0}
    second = {"ce_loss_clean": 4.0, "kl_div_spliced": 3.0, "ce_eval_predictions": 3.0}
    merged = merge_losses([first, second])
    assert merged["ce_loss_clean"] == pytest.approx(3.25)
    assert merged["kl_div_spliced"] == pytest.approx(2.25)
    assert merged["ce_eval_predictions"] == 4.0


def test_scores_nan_when_ablation_changes_nothing():
    losses = {
        "ce_loss_clean": 2.0,
        "ce_loss_spliced": 2.0,
        "ce_loss_zero_ablated": 2.0,
        "kl_div_spliced": 0.0,
        "kl_div_zero_ablated": 0.0,
    }
    scores = with_scores(losses)
    assert scores["ce_loss_score"] != scores["ce_loss_score"]
    assert scores["kl_div_score"] != scores["kl_div_score"]


def test_empty_splice_mask_rejected(model_and_tokens):
    model, tokens = model_and_tokens
    with pytest.raises(ValueError, match="selects no position"):
        spliced_scores(model, identity_sae(), tokens, splice_mask=torch.zeros_like(tokens, dtype=torch.bool))


# A quickstart-style SAE trained on real text ---------------------------------------------------


@pytest.fixture(scope="module")
def trained_sae(model_and_tokenizer):
    """A topk SAE (k=32, expansion 4) on blocks.5.hook_resid_pre, trained for 16 steps of 256
    served activations of the embedded training text, normalized as in the quickstart."""
    model, tokenizer = model_and_tokenizer
    policy = model_info(MODEL).token_policy()
    stream = TokenStream("embedded", tokenizer, policy, context_size=64, batch_size=8, shuffle_windows=1)
    parts, n_tokens = [], 0
    for batch in stream:
        activations = run_hookpoints(model, batch.tokens, [QUICKSTART_HOOK])[QUICKSTART_HOOK]
        parts.append(activations[batch.keep])
        n_tokens += int(batch.keep.sum())
        if n_tokens >= 4096:
            break
    activations = torch.cat(parts)[:4096]

    sae = SAE.from_config(
        SAEConfig(
            architecture="topk",
            d_in=D_MODEL,
            d_sae=4 * D_MODEL,
            k=32,
            hook_name=QUICKSTART_HOOK,
            normalize_activations="expected_average_only_in",
        )
    )
    sae.activation_norm_scale = D_MODEL**0.5 / float(activations.norm(dim=-1).mean())
    trainer = SAETrainer(sae, TrainerConfig(total_tokens=4096, batch_size=256, lr=1e-3, log_every_steps=8))
    trainer.fit(activations.split(256))
    assert trainer.tokens_trained == 4096
    sae.eval()
    return sae


@pytest.fixture(scope="module")
def heldout_batch(model_and_tokenizer):
    """Two 64-token windows of the embedded held-out text and their served positions."""
    _, tokenizer = model_and_tokenizer
    policy = model_info(MODEL).token_policy()
    stream = TokenStream(
        "embedded", tokenizer, policy, context_size=64, batch_size=2, split="heldout", shuffle_windows=1
    )
    return next(iter(stream))


def test_trained_sae_scores_between_zero_and_one(model_and_tokenizer, trained_sae, heldout_batch):
    model, _ = model_and_tokenizer
    tokens, keep = heldout_batch.tokens, heldout_batch.keep
    assert not keep[:, 0].any()
    scores = spliced_scores(model, trained_sae, tokens, splice_mask=keep)
    assert 0.0 < scores["ce_loss_score"] < 1.0
    assert 0.0 < scores["kl_div_score"] < 1.0
    assert scores["ce_loss_clean"] < scores["ce_loss_spliced"] < scores["ce_loss_zero_ablated"]

    # By hand: the SAE replaces the activation at served positions only, and every prediction counts.
    def replace(activation, hook):
        return torch.where(keep[..., None], trained_sae(activation), activation)

    with torch.no_grad():
        logits = model.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(QUICKSTART_HOOK, replace)])
    assert scores["ce_loss_spliced"] == pytest.approx(hand_ce(logits, tokens), rel=1e-5)
    assert scores["ce_eval_predictions"] == tokens.shape[0] * (tokens.shape[1] - 1)

    everywhere = spliced_scores(model, trained_sae, tokens)
    assert everywhere["ce_loss_spliced"] != pytest.approx(scores["ce_loss_spliced"], rel=1e-4)


# SplicedModel ---------------------------------------------------------------------------------


def test_add_sae_splices_until_reset(model_and_tokens):
    model, tokens = model_and_tokens
    before = logits_of(model, tokens)
    spliced = SplicedModel(model)
    spliced.add_sae(zero_sae())
    try:
        assert set(spliced.acts_to_saes) == {HOOK}
        # The SAE sits on the model itself, so a direct call is spliced too.
        assert not torch.allclose(logits_of(model, tokens), before)
        model.reset_hooks()
        assert not torch.allclose(logits_of(model, tokens), before), "reset_hooks must keep the SAE"
    finally:
        spliced.reset_saes()
    torch.testing.assert_close(logits_of(model, tokens), before)
    assert spliced.acts_to_saes == {}
    assert model.hook_dict[HOOK].fwd_hooks == []


def test_saes_context_clean_after_exception(model_and_tokens):
    model, tokens = model_and_tokens
    before = logits_of(model, tokens)
    spliced = SplicedModel(model)
    with pytest.raises(RuntimeError, match="inside the context"):
        with spliced.saes([zero_sae()]):
            assert not torch.allclose(logits_of(model, tokens), before)
            raise RuntimeError("inside the context")
    torch.testing.assert_close(logits_of(model, tokens), before)
    assert spliced.acts_to_saes == {}


def test_saes_context_restores_replaced_sae(model_and_tokens):
    model, _ = model_and_tokens
    spliced = SplicedModel(model)
    outer, inner = random_topk_sae(seed=1), random_topk_sae(seed=2)
    spliced.add_sae(outer)
    try:
        with spliced.saes([inner]):
            assert spliced.acts_to_saes[HOOK] is inner
            assert len(model.hook_dict[HOOK].fwd_hooks) == 1
        assert spliced.acts_to_saes[HOOK] is outer
        assert len(model.hook_dict[HOOK].fwd_hooks) == 1
    finally:
        spliced.reset_saes()


def test_bad_splice_mask_raises_and_cleans_up(model_and_tokens):
    model, tokens = model_and_tokens
    before = logits_of(model, tokens)
    spliced = SplicedModel(model)
    wrong = torch.ones(tokens.shape[0], tokens.shape[1] + 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="splice_mask has shape"):
        with torch.no_grad():
            spliced.run_with_saes(tokens, saes=[zero_sae()], splice_mask=wrong)
    torch.testing.assert_close(logits_of(model, tokens), before)
    assert spliced.acts_to_saes == {}


def test_unknown_hookpoint_rejected(model_and_tokens):
    model, tokens = model_and_tokens
    with pytest.raises(ValueError, match="blocks.99.hook_resid_pre"):
        SplicedModel(model).add_sae(zero_sae("blocks.99.hook_resid_pre"))
    with pytest.raises(ValueError, match="does not exist"):
        spliced_scores(model, zero_sae("blocks.99.hook_resid_pre"), tokens)


def test_module_run_with_saes_leaves_model_clean(model_and_tokens):
    model, tokens = model_and_tokens
    before = logits_of(model, tokens)
    spliced_logits = run_with_saes(model, tokens, [zero_sae()])
    torch.testing.assert_close(logits_of(model, tokens), before)
    assert float(next_token_ce(spliced_logits, tokens)) != pytest.approx(float(next_token_ce(before, tokens)))


def test_cache_with_saes_entries(model_and_tokens):
    model, tokens = model_and_tokens
    before = logits_of(model, tokens)
    sae = random_topk_sae()
    spliced = SplicedModel(model)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(tokens, names_filter=[HOOK])
        logits, cache = spliced.run_with_cache_with_saes(tokens, saes=[sae])

    batch, pos = tokens.shape
    for name in SAE_HOOKS:
        expected = (batch, pos, sae.cfg.d_sae) if name == "hook_sae_acts_post" else (batch, pos, D_MODEL)
        assert tuple(cache[f"{HOOK}.{name}"].shape) == expected, name
    sae_input = cache[f"{HOOK}.hook_sae_input"]
    latents = cache[f"{HOOK}.hook_sae_acts_post"]
    reconstruction = cache[f"{HOOK}.hook_sae_recons"]
    torch.testing.assert_close(sae_input, clean_cache[HOOK])
    with torch.no_grad():
        torch.testing.assert_close(latents, sae.encode(sae_input))
        torch.testing.assert_close(reconstruction, sae.decode(latents))
    assert int((latents > 0).sum(dim=-1).max()) <= 64
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_error"], sae_input - reconstruction)
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_output"], reconstruction)
    # The model's own entry at the hookpoint is what flowed on into the model.
    torch.testing.assert_close(cache[HOOK], reconstruction)
    assert "blocks.10.hook_resid_pre" in cache.keys()

    torch.testing.assert_close(logits_of(model, tokens), before)
    assert spliced.acts_to_saes == {}
    assert model.hook_dict[HOOK].fwd_hooks == []


def test_cache_names_filter_and_splice_mask(model_and_tokens):
    model, tokens = model_and_tokens
    sae = random_topk_sae()
    splice_mask = torch.ones_like(tokens, dtype=torch.bool)
    splice_mask[:, :5] = False
    with torch.no_grad():
        _, cache = SplicedModel(model).run_with_cache_with_saes(
            tokens, saes=[sae], splice_mask=splice_mask, names_filter=lambda name: name.startswith(f"{HOOK}.")
        )
    assert set(cache.keys()) == {f"{HOOK}.{name}" for name in SAE_HOOKS}
    sae_input = cache[f"{HOOK}.hook_sae_input"]
    output = cache[f"{HOOK}.hook_sae_output"]
    torch.testing.assert_close(output[:, :5], sae_input[:, :5])
    torch.testing.assert_close(output[:, 5:], cache[f"{HOOK}.hook_sae_recons"][:, 5:])
    assert float(cache[f"{HOOK}.hook_sae_error"][:, :5].abs().max()) == 0.0


def test_error_term_keeps_clean_output(model_and_tokens):
    model, tokens = model_and_tokens
    before = logits_of(model, tokens)
    sae = random_topk_sae()
    with torch.no_grad():
        logits, cache = SplicedModel(model).run_with_cache_with_saes(tokens, saes=[sae], use_error_term=True)
    torch.testing.assert_close(logits, before, atol=1e-3, rtol=1e-4)
    latents = cache[f"{HOOK}.hook_sae_acts_post"]
    assert int((latents > 0).sum()) > 0
    with torch.no_grad():
        torch.testing.assert_close(latents, sae.encode(cache[f"{HOOK}.hook_sae_input"]))
    torch.testing.assert_close(logits_of(model, tokens), before)


def test_error_term_passes_latent_edits(model_and_tokens):
    # With the error term, zeroing every latent leaves x - sae(x) + decode(0) flowing on.
    model, tokens = model_and_tokens
    sae = random_topk_sae()

    def zero_latents(latents, hook):
        return torch.zeros_like(latents)

    with torch.no_grad():
        edited = SplicedModel(model).run_with_hooks_with_saes(
            tokens,
            saes=[sae],
            use_error_term=True,
            fwd_hooks=[(f"{HOOK}.hook_sae_acts_post", zero_latents)],
            return_type="logits",
        )

        def by_hand(activation, hook):
            return activation - sae(activation) + sae.decode(torch.zeros(sae.cfg.d_sae))

        expected = model.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(HOOK, by_hand)])
    torch.testing.assert_close(edited, expected, atol=1e-3, rtol=1e-4)
    assert not torch.allclose(edited, logits_of(model, tokens), atol=1e-2)


def test_two_saes_on_two_hookpoints(model_and_tokens):
    model, tokens = model_and_tokens
    before = logits_of(model, tokens)
    first, second = random_topk_sae(HOOK, seed=1), random_topk_sae(SECOND_HOOK, seed=2)
    spliced = SplicedModel(model)
    with torch.no_grad():
        logits, cache = spliced.run_with_cache_with_saes(tokens, saes=[first, second])
        expected = model.run_with_hooks(
            tokens,
            return_type="logits",
            fwd_hooks=[(HOOK, lambda x, hook: first(x)), (SECOND_HOOK, lambda x, hook: second(x))],
        )
        only_first = spliced.run_with_saes(tokens, saes=[first], return_type="logits")
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits, only_first)
    for hook_name in (HOOK, SECOND_HOOK):
        assert f"{hook_name}.hook_sae_acts_post" in cache.keys()
    torch.testing.assert_close(logits_of(model, tokens), before)
