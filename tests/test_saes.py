"""The SAE library: SAELens file compatibility both ways, architecture rules, folding."""

from __future__ import annotations

import copy
import json

import pytest
import sae_lens
import torch
from safetensors.torch import load_file, save_file

from saesweep import SAE, SAEConfig
from saesweep.saes import list_architectures
from saesweep.saes.base import SparseLatents
from saesweep.saes.batchtopk import batch_topk_activation, batch_topk_latents
from saesweep.saes.jumprelu import JumpReLUFunction, StepFunction
from saesweep.saes.topk import topk_activation

D_IN, D_SAE = 24, 96


def make_sae(architecture: str, **overrides) -> SAE:
    """A seeded SAE whose biases and thresholds are all nonzero."""
    cfg = SAEConfig(
        architecture=architecture,
        d_in=D_IN,
        d_sae=D_SAE,
        k=8,
        model_name="test-model",
        hook_name="blocks.3.hook_resid_pre",
        context_size=64,
        prepend_bos=False,
        dataset_path="embedded",
        **overrides,
    )
    sae = SAE.from_config(cfg)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            if name.startswith("b_") or name == "r_mag":
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
        if architecture == "jumprelu":
            sae.threshold.copy_(0.05 + 0.1 * torch.rand(D_SAE, generator=generator))
        if architecture == "batchtopk":
            sae.topk_threshold.fill_(0.07)
    return sae


@pytest.fixture
def inputs() -> torch.Tensor:
    return torch.randn(2, 10, D_IN, generator=torch.Generator().manual_seed(2))


def test_registry_lists_all_architectures():
    assert set(list_architectures()) == {"standard", "gated", "jumprelu", "topk", "batchtopk"}


@pytest.mark.parametrize("architecture", ["standard", "gated", "jumprelu", "topk", "batchtopk"])
def test_saved_sae_loads_in_saelens(tmp_path, inputs, architecture):
    sae = make_sae(architecture)
    sae.save_model(tmp_path)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))

    assert theirs.cfg.architecture() == sae.saved_architecture
    assert theirs.cfg.metadata.hook_name == "blocks.3.hook_resid_pre"
    assert theirs.cfg.metadata.model_name == "test-model"
    torch.testing.assert_close(theirs.encode(inputs), sae.encode(inputs))
    latents = sae.encode(inputs)
    torch.testing.assert_close(theirs.decode(latents), sae.decode(latents))


@pytest.mark.parametrize("architecture", ["standard", "gated", "jumprelu", "topk", "batchtopk"])
def test_saved_sae_reloads_in_saesweep(tmp_path, inputs, architecture):
    sae = make_sae(architecture)
    sae.save_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)

    assert loaded.cfg.hook_name == sae.cfg.hook_name
    assert loaded.cfg.context_size == 64
    torch.testing.assert_close(loaded.encode(inputs), sae.encode(inputs))
    torch.testing.assert_close(loaded(inputs), sae(inputs))


def test_cfg_json_has_saelens_v6_fields(tmp_path):
    make_sae("topk").save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())

    assert cfg["architecture"] == "topk"
    assert cfg["k"] == 8
    assert int(cfg["metadata"]["sae_lens_version"].split(".")[0]) >= 6
    for key in ("model_name", "hook_name", "context_size", "prepend_bos", "dataset_path"):
        assert key in cfg["metadata"], key
    assert cfg["metadata"]["model_from_pretrained_kwargs"] == {}
    assert set(load_file(tmp_path / "sae_weights.safetensors")) == {"W_enc", "W_dec", "b_enc", "b_dec"}


def _randomize(module: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
            if name == "threshold":
                param.abs_()


SAELENS_BUILDERS = {
    "standard": lambda: sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=D_IN, d_sae=D_SAE)),
    "gated": lambda: sae_lens.GatedSAE(sae_lens.GatedSAEConfig(d_in=D_IN, d_sae=D_SAE)),
    "jumprelu": lambda: sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE)),
    "topk": lambda: sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=6)),
    "topk_rescaled": lambda: sae_lens.TopKSAE(
        sae_lens.TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=6, rescale_acts_by_decoder_norm=True)
    ),
}


@pytest.mark.parametrize("name", sorted(SAELENS_BUILDERS))
def test_saelens_sae_loads_in_saesweep(tmp_path, inputs, name):
    theirs = SAELENS_BUILDERS[name]()
    _randomize(theirs)
    theirs.save_model(str(tmp_path))
    ours = SAE.load_from_disk(tmp_path)

    torch.testing.assert_close(ours.encode(inputs), theirs.encode(inputs))
    torch.testing.assert_close(ours(inputs), theirs(inputs))


def test_saelens_batchtopk_training_sae_loads_in_saesweep(tmp_path, inputs):
    cfg = sae_lens.BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=6)
    theirs = sae_lens.BatchTopKTrainingSAE(cfg)
    _randomize(theirs)
    theirs.topk_threshold = torch.tensor(0.05, dtype=torch.double)
    theirs.save_inference_model(str(tmp_path))
    inference = sae_lens.SAE.load_from_disk(str(tmp_path))
    ours = SAE.load_from_disk(tmp_path)

    assert ours.cfg.architecture == "jumprelu"
    torch.testing.assert_close(ours.encode(inputs), inference.encode(inputs))


def test_load_device_argument_wins(tmp_path):
    make_sae("standard").save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["device"] = "meta"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))

    sae = SAE.load_from_disk(tmp_path, device="cpu")
    assert sae.W_enc.device.type == "cpu"
    assert sae.cfg.device == "cpu"


def test_load_rejects_missing_tensor(tmp_path):
    make_sae("jumprelu").save_model(tmp_path)
    tensors = load_file(tmp_path / "sae_weights.safetensors")
    del tensors["threshold"]
    save_file(tensors, tmp_path / "sae_weights.safetensors")

    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['threshold'\]") as error:
        SAE.load_from_disk(tmp_path)
    assert "sae_weights.safetensors" in str(error.value)


def test_load_rejects_unexpected_tensor(tmp_path):
    make_sae("standard").save_model(tmp_path)
    tensors = load_file(tmp_path / "sae_weights.safetensors")
    tensors["scaling_factor"] = torch.ones(D_SAE)
    save_file(tensors, tmp_path / "sae_weights.safetensors")

    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) \['scaling_factor'\]"):
        SAE.load_from_disk(tmp_path)


def test_load_rejects_unknown_architecture(tmp_path):
    make_sae("standard").save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["architecture"] = "matryoshka"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))

    with pytest.raises(ValueError, match="unknown architecture 'matryoshka'") as error:
        SAE.load_from_disk(tmp_path)
    assert "cfg.json" in str(error.value)


def test_from_pretrained_local_folder(tmp_path, inputs):
    sae = make_sae("topk")
    sparsity = torch.linspace(-5, -1, D_SAE)
    sae.save_model(tmp_path / "blocks.3.hook_resid_pre", sparsity=sparsity)

    loaded, cfg_dict, loaded_sparsity = SAE.from_pretrained(str(tmp_path), "blocks.3.hook_resid_pre")
    assert cfg_dict["architecture"] == "topk"
    torch.testing.assert_close(loaded_sparsity, sparsity)
    torch.testing.assert_close(loaded(inputs), sae(inputs))


def test_topk_keeps_exactly_k_with_ties():
    row = torch.tensor([[1.0, 2.0, 2.0, 2.0, 3.0]])
    acts = topk_activation(row, 3)
    assert int((acts != 0).sum()) == 3
    assert float(acts[0, 4]) == 3.0


def test_topk_l0_is_k_on_every_row(inputs):
    sae = make_sae("topk")
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive, so ReLU zeroes none
    acts = sae.encode(inputs)
    assert ((acts != 0).sum(dim=-1) == 8).all()


def test_topk_leading_dims_match_flat(inputs):
    sae = make_sae("topk")
    flat = inputs.reshape(-1, D_IN)
    torch.testing.assert_close(sae.encode(inputs).reshape(-1, D_SAE), sae.encode(flat))
    torch.testing.assert_close(sae(inputs).reshape(-1, D_IN), sae(flat))


def test_jumprelu_threshold_gradient_matches_kernel_estimate():
    bandwidth = 0.1
    theta = torch.tensor([0.5, 0.5], requires_grad=True)
    # Latent 0: 0.47 and 0.52 lie inside the kernel window |z - theta| < bandwidth / 2,
    # 0.8 does not. Latent 1: -0.3 is far below; a relu applied first would move it to 0.
    z = torch.tensor([[0.47, -0.3], [0.52, 0.46], [0.8, 0.9]])

    JumpReLUFunction.apply(z, theta, bandwidth).sum().backward()
    # dtheta = -(theta / eps) * sum of K((z - theta) / eps) over the batch
    expected = torch.tensor([-(0.5 / bandwidth) * 2, -(0.5 / bandwidth) * 1])
    torch.testing.assert_close(theta.grad, expected)

    theta.grad = None
    StepFunction.apply(z, theta, bandwidth).sum().backward()
    torch.testing.assert_close(theta.grad, torch.tensor([-2 / bandwidth, -1 / bandwidth]))


def test_jumprelu_sae_threshold_receives_gradient_from_l0(inputs):
    sae = make_sae("jumprelu", jumprelu_bandwidth=0.5)
    output = sae.training_loss(inputs)
    output.losses["l0_loss"].backward()
    assert sae.threshold.grad is not None
    assert float(sae.threshold.grad.abs().sum()) > 0
    # The L0 penalty pushes thresholds up: its gradient is never positive.
    assert float(sae.threshold.grad.max()) <= 0


@pytest.mark.parametrize("architecture", ["standard", "gated", "jumprelu", "topk", "batchtopk"])
@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_folding_matches_scaled_input(inputs, architecture, apply_b_dec_to_input):
    sae = make_sae(architecture, apply_b_dec_to_input=apply_b_dec_to_input)
    assert float(sae.b_dec.abs().min()) > 0
    scale = 3.7
    expected = sae(scale * inputs) / scale
    expected_latents = sae.encode(scale * inputs)

    sae.fold_activation_norm_scaling_factor(scale)
    torch.testing.assert_close(sae(inputs), expected)
    torch.testing.assert_close(sae.encode(inputs), expected_latents)


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
def test_normalized_sae_saves_folded(tmp_path, inputs, architecture):
    sae = make_sae(architecture, normalize_activations="expected_average_only_in")
    sae.activation_norm_scale = 0.25
    sae.save_model(tmp_path)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))

    assert theirs.cfg.normalize_activations == "none"
    torch.testing.assert_close(theirs(inputs), sae(inputs))
    torch.testing.assert_close(SAE.load_from_disk(tmp_path)(inputs), sae(inputs))


def test_training_loss_terms_per_architecture(inputs):
    dead = torch.ones(D_SAE, dtype=torch.bool)
    expected = {
        "standard": {"mse_loss", "l1_loss"},
        "gated": {"mse_loss", "l1_loss", "auxiliary_reconstruction_loss"},
        "jumprelu": {"mse_loss", "l0_loss", "pre_act_loss"},
        "topk": {"mse_loss", "auxiliary_reconstruction_loss"},
        "batchtopk": {"mse_loss", "auxiliary_reconstruction_loss"},
    }
    for architecture, names in expected.items():
        sae = make_sae(architecture, pre_act_loss_coefficient=1e-3)
        output = sae.training_loss(inputs, dead_mask=dead)
        assert set(output.losses) == names, architecture
        torch.testing.assert_close(output.loss, sum(output.losses.values()))


def test_batchtopk_keeps_k_per_token_on_average(inputs):
    sae = make_sae("batchtopk")
    output = sae.training_loss(inputs)
    n_tokens = inputs.shape[0] * inputs.shape[1]
    assert int((output.feature_acts != 0).sum()) <= 8 * n_tokens
    assert float(sae.topk_threshold) > 0


def test_initialization_is_seeded_and_tied():
    a = SAE.from_config(SAEConfig(architecture="standard", d_in=D_IN, d_sae=D_SAE, seed=5))
    b = SAE.from_config(SAEConfig(architecture="standard", d_in=D_IN, d_sae=D_SAE, seed=5))
    torch.testing.assert_close(a.W_dec, b.W_dec)
    torch.testing.assert_close(a.W_enc, a.W_dec.T)
    torch.testing.assert_close(a.W_dec.norm(dim=-1), torch.full((D_SAE,), 0.1))
    topk = SAE.from_config(SAEConfig(architecture="topk", d_in=D_IN, d_sae=D_SAE, k=4))
    torch.testing.assert_close(topk.W_dec.norm(dim=-1), torch.ones(D_SAE))


def test_config_rejects_k_above_d_sae():
    with pytest.raises(ValueError, match="k=200"):
        SAEConfig(architecture="topk", d_in=D_IN, d_sae=D_SAE, k=200)


def test_config_rejects_unknown_architecture():
    with pytest.raises(ValueError, match="unknown SAE architecture 'sparse'"):
        SAEConfig(architecture="sparse", d_in=D_IN, d_sae=D_SAE)


def dead_latents(n_dead: int) -> torch.Tensor:
    """[D_SAE] bool mask with `n_dead` latents, chosen at random, marked dead."""
    mask = torch.zeros(D_SAE, dtype=torch.bool)
    mask[torch.randperm(D_SAE, generator=torch.Generator().manual_seed(4))[:n_dead]] = True
    return mask


# With D_IN 24, AuxK uses k_aux = 12 dead latents: 5 dead latents are fewer
# than k_aux (all of them used, the loss scaled by 5 / 12), and 48 are more.
@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
@pytest.mark.parametrize("n_dead", [0, 5, 48])
def test_sparse_decoder_matches_dense(inputs, architecture, n_dead):
    dense_sae = make_sae(architecture)
    sparse_sae = copy.deepcopy(dense_sae)
    dead_mask = dead_latents(n_dead)

    dense = dense_sae.training_loss(inputs, dead_mask=dead_mask, sparse_decoder=False)
    sparse = sparse_sae.training_loss(inputs, dead_mask=dead_mask, sparse_decoder=True)
    dense.loss.backward()
    sparse.loss.backward()

    assert set(sparse.losses) == set(dense.losses)
    for name, value in dense.losses.items():
        torch.testing.assert_close(sparse.losses[name], value, msg=name)
    aux = float(dense.losses["auxiliary_reconstruction_loss"].detach())
    assert aux > 0 if n_dead else aux == 0
    torch.testing.assert_close(sparse.loss, dense.loss)
    torch.testing.assert_close(sparse.sae_out, dense.sae_out)
    torch.testing.assert_close(sparse.hidden_pre, dense.hidden_pre)
    torch.testing.assert_close(sparse.feature_acts, dense.feature_acts)
    assert not sparse.feature_acts.requires_grad
    for name, param in dense_sae.named_parameters():
        torch.testing.assert_close(dict(sparse_sae.named_parameters())[name].grad, param.grad, msg=name)
    if architecture == "batchtopk":
        torch.testing.assert_close(sparse_sae.topk_threshold, dense_sae.topk_threshold)


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_sparse_decoder_under_autocast(inputs, architecture):
    dense_sae = make_sae(architecture)
    sparse_sae = copy.deepcopy(dense_sae)
    dead_mask = dead_latents(48)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense = dense_sae.training_loss(inputs, dead_mask=dead_mask, sparse_decoder=False)
        sparse = sparse_sae.training_loss(inputs, dead_mask=dead_mask, sparse_decoder=True)
    dense.loss.backward()
    sparse.loss.backward()

    # The dense decoder multiplies in bfloat16, while the sparse one sums the
    # float32 rows of W_dec. So the two differ by bfloat16 rounding, a relative
    # error of up to 2**-8 (about 0.4%) per rounded operand.
    assert sparse.sae_out.dtype == torch.float32
    torch.testing.assert_close(sparse.feature_acts, dense.feature_acts)
    for name, value in dense.losses.items():
        torch.testing.assert_close(sparse.losses[name], value, rtol=5e-3, atol=1e-5, msg=name)
    for name, param in dense_sae.named_parameters():
        sparse_grad = dict(sparse_sae.named_parameters())[name].grad
        assert sparse_grad.dtype == torch.float32, name
        relative_error = float((sparse_grad - param.grad).norm() / param.grad.norm())
        assert relative_error < 2e-2, name


def test_sparse_latents_decode_bfloat16_values():
    generator = torch.Generator().manual_seed(6)
    weight = torch.randn(D_SAE, D_IN, generator=generator)
    values = torch.rand(4, 3, generator=generator).to(torch.bfloat16)
    indices = torch.randint(D_SAE, (4, 3), generator=generator)
    dense = torch.zeros(4, D_SAE).scatter(-1, indices, values.float())

    with torch.autocast("cpu", dtype=torch.bfloat16):
        decoded = SparseLatents(indices=indices, values=values).decode(weight)

    assert decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, dense @ weight)


@pytest.mark.parametrize("k", [1.0, 2.0])
def test_batch_topk_latents_with_empty_token(k):
    # Token 1 has no positive pre-activation, so with k = 1 it gets no latent. With
    # k = 2 the six selected entries include three zeros at arbitrary positions,
    # so any token may own some, and they must decode to nothing.
    hidden_pre = torch.tensor([[5.0, 4.0, -1.0, -1.0], [-1.0, -2.0, -1.0, -3.0], [-1.0, -1.0, 3.0, -1.0]])
    weight = torch.randn(4, 5, generator=torch.Generator().manual_seed(5))

    latents, feature_acts = batch_topk_latents(hidden_pre, k)

    expected = batch_topk_activation(hidden_pre, k)
    torch.testing.assert_close(feature_acts, expected)
    torch.testing.assert_close(latents.decode(weight), expected @ weight)
    assert latents.indices.numel() == int(3 * k)
    assert latents.offsets is not None
    if k == 1.0:
        assert latents.offsets.tolist() == [0, 2, 2]
    else:
        assert int((latents.values == 0).sum()) == 3
