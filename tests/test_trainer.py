"""The trainer on synthetic sparse data with a known dictionary."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from saesweep import SAE, SAEConfig
from saesweep.training.metrics import evaluate_sae
from saesweep.training.trainer import SAETrainer, TrainerConfig, TrainingDivergedError, lr_factor, rebatch

D_IN, N_FEATURES, D_SAE = 32, 64, 128


def synthetic_batch(n: int, seed: int, active: int = 3) -> torch.Tensor:
    """[n, D_IN] sums of `active` dictionary directions with random magnitudes, plus an offset."""
    dictionary = torch.randn(N_FEATURES, D_IN, generator=torch.Generator().manual_seed(123))
    dictionary /= dictionary.norm(dim=-1, keepdim=True)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.rand(n, N_FEATURES, generator=generator).argsort(dim=-1)[:, :active]
    magnitudes = torch.zeros(n, N_FEATURES)
    magnitudes.scatter_(1, chosen, torch.rand(n, active, generator=generator) + 0.5)
    return magnitudes @ dictionary + 2.0


def synthetic_stream(seed: int):
    step = 0
    while True:
        yield synthetic_batch(1024, seed=seed * 100_000 + step)
        step += 1


# Sparsity settings and the held-out explained variance each architecture must
# reach after 300 steps of 1024 tokens (the data has 3 active features per token).
RECOVERY_CASES = {
    "standard": ({"l1_coefficient": 0.3}, 0.85),
    "gated": ({"l1_coefficient": 0.3}, 0.85),
    "jumprelu": ({"l0_coefficient": 0.01}, 0.85),
    "topk": ({"k": 3}, 0.85),
    "batchtopk": ({"k": 3}, 0.85),
}


@pytest.mark.parametrize("architecture", sorted(RECOVERY_CASES))
def test_training_recovers_synthetic_dictionary(architecture):
    overrides, min_explained_variance = RECOVERY_CASES[architecture]
    sae = SAE.from_config(SAEConfig(architecture=architecture, d_in=D_IN, d_sae=D_SAE, **overrides))
    logged: list[dict[str, float]] = []
    cfg = TrainerConfig(total_tokens=300 * 1024, batch_size=1024, lr=3e-3, log_every_steps=50, dead_latent_window=20_000)
    SAETrainer(sae, cfg, report_fn=lambda trainer, report: logged.append(report.metrics)).fit(synthetic_stream(seed=1))

    assert logged[-1]["tokens_trained"] == 300 * 1024
    assert logged[-1]["loss"] < 0.5 * logged[0]["loss"]
    heldout = evaluate_sae(sae, [synthetic_batch(4096, seed=999)])
    assert heldout.explained_variance > min_explained_variance
    if architecture == "topk":
        assert heldout.l0 == 3.0


def test_unit_norm_decoder_kept_after_steps():
    sae = SAE.from_config(SAEConfig(architecture="topk", d_in=D_IN, d_sae=D_SAE, k=4))
    SAETrainer(sae, TrainerConfig(total_tokens=10 * 256, batch_size=256, lr=1e-2)).fit(synthetic_stream(seed=2))
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))


def test_nan_loss_raises_with_step_and_fix():
    sae = SAE.from_config(SAEConfig(architecture="standard", d_in=D_IN, d_sae=D_SAE))
    bad = torch.full((256, D_IN), float("nan"))
    trainer = SAETrainer(sae, TrainerConfig(total_tokens=1024, batch_size=256))
    with pytest.raises(TrainingDivergedError, match="at step 0.*lower the learning rate"):
        trainer.fit(iter([bad] * 4))


def test_resume_from_state_matches_uninterrupted_run():
    def make():
        sae = SAE.from_config(SAEConfig(architecture="jumprelu", d_in=D_IN, d_sae=D_SAE, l0_coefficient=0.01))
        cfg = TrainerConfig(total_tokens=20 * 256, batch_size=256, lr=3e-3, lr_schedule="cosine", lr_warmup_steps=3)
        return SAETrainer(sae, cfg)

    batches = [synthetic_batch(256, seed=i) for i in range(20)]
    straight = make()
    straight.fit(iter(batches))

    first = make()
    first.fit(iter(batches[:8]))
    assert first.step == 8
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    resumed.fit(iter(batches[8:]))

    assert resumed.step == straight.step == 20
    for name, tensor in straight.sae.state_dict().items():
        torch.testing.assert_close(resumed.sae.state_dict()[name], tensor)


def test_stop_request_writes_checkpoint():
    sae = SAE.from_config(SAEConfig(architecture="standard", d_in=D_IN, d_sae=D_SAE))
    checkpoints: list[int] = []

    def record(trainer, report):
        if report.checkpoint:
            checkpoints.append(report.step)

    trainer = SAETrainer(sae, TrainerConfig(total_tokens=100 * 256, batch_size=256), report_fn=record)

    def stream():
        for i in range(100):
            if i == 5:
                trainer.request_stop()
            yield synthetic_batch(256, seed=i)

    trainer.fit(stream())
    assert checkpoints == [5]
    assert not trainer.done


def test_reports_at_log_and_checkpoint_steps():
    sae = SAE.from_config(SAEConfig(architecture="standard", d_in=D_IN, d_sae=D_SAE))
    reports = []
    cfg = TrainerConfig(total_tokens=10 * 64, batch_size=64, log_every_steps=4, checkpoint_every_steps=3)
    SAETrainer(sae, cfg, report_fn=lambda trainer, report: reports.append(report)).fit(synthetic_stream(seed=3))

    assert [(r.step, bool(r.metrics), r.checkpoint, r.final) for r in reports] == [
        (3, False, True, False),
        (4, True, False, False),
        (6, False, True, False),
        (8, True, False, False),
        (9, False, True, False),
        (10, True, False, True),
    ]
    assert reports[-1].metrics["tokens_trained"] == 640
    for name in ("explained_variance", "l0", "l1", "mse", "dead_latents_frac", "lr", "mse_loss", "l1_loss"):
        assert name in reports[1].metrics, name


def test_lr_schedule_warmup_and_decay():
    cfg = TrainerConfig(total_tokens=100, batch_size=1, lr_warmup_steps=10, lr_schedule="linear", lr_decay_steps=20)
    assert lr_factor(cfg, 0) == pytest.approx(0.1)
    assert lr_factor(cfg, 9) == pytest.approx(1.0)
    assert lr_factor(cfg, 50) == 1.0
    assert lr_factor(cfg, 90) == pytest.approx(0.5)
    cosine = TrainerConfig(total_tokens=100, batch_size=1, lr_schedule="cosine")
    assert lr_factor(cosine, 50) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_rebatch_regroups_uneven_batches():
    parts = [torch.arange(n * 2, dtype=torch.float32).reshape(n, 2) for n in (3, 5, 1, 7)]
    out = list(rebatch(iter(parts), 4))
    assert [b.shape[0] for b in out] == [4, 4, 4, 4]
    torch.testing.assert_close(torch.cat(out), torch.cat(parts)[:16])


@pytest.mark.parametrize("architecture", ["topk", "jumprelu"])
def test_autocast_training_recovers_dictionary(architecture):
    overrides, min_explained_variance = RECOVERY_CASES[architecture]
    sae = SAE.from_config(SAEConfig(architecture=architecture, d_in=D_IN, d_sae=D_SAE, **overrides))
    cfg = TrainerConfig(
        total_tokens=300 * 1024, batch_size=1024, lr=3e-3, log_every_steps=50, dead_latent_window=20_000, autocast=True
    )
    SAETrainer(sae, cfg).fit(synthetic_stream(seed=1))

    assert sae.W_enc.dtype == torch.float32
    heldout = evaluate_sae(sae, [synthetic_batch(4096, seed=999)])
    assert heldout.explained_variance > min_explained_variance


class MatmulDtypes(TorchDispatchMode):
    """Record the input dtype of every matrix multiplication, and the weight dtype
    of every embedding_bag, that reaches the kernels."""

    def __init__(self):
        super().__init__()
        self.dtypes: list[torch.dtype] = []
        self.embedding_bag_dtypes: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.dtypes.append(args[-2].dtype)
        if func is torch.ops.aten._embedding_bag.default:
            self.embedding_bag_dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("autocast", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_autocast_sets_matmul_dtype(autocast, expected):
    sae = SAE.from_config(SAEConfig(architecture="topk", d_in=D_IN, d_sae=D_SAE, k=3))
    cfg = TrainerConfig(total_tokens=1024, batch_size=1024, autocast=autocast, sparse_decoder=False)
    trainer = SAETrainer(sae, cfg)
    batch = synthetic_batch(1024, seed=5)
    with MatmulDtypes() as recorded:
        trainer.train_step(batch)

    # Encoder and decoder forward, and their weight and input gradients.
    assert len(recorded.dtypes) >= 4
    assert set(recorded.dtypes) == {expected}
    assert recorded.embedding_bag_dtypes == []
    assert sae.W_enc.dtype == torch.float32


@pytest.mark.parametrize(("autocast", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_sparse_decoder_replaces_decoder_matmuls(autocast, expected):
    sae = SAE.from_config(SAEConfig(architecture="topk", d_in=D_IN, d_sae=D_SAE, k=3))
    trainer = SAETrainer(sae, TrainerConfig(total_tokens=1024, batch_size=1024, autocast=autocast))
    batch = synthetic_batch(1024, seed=5)
    with MatmulDtypes() as recorded:
        trainer.train_step(batch)

    # Only the encoder runs matmuls: its forward pass, the gradient of W_enc, and
    # the gradient of its input, which b_dec reaches because it is subtracted from
    # the input by default. The decoder is one embedding_bag on the float32 W_dec.
    # No latent is dead on the first step, so AuxK adds no matmul.
    assert len(recorded.dtypes) == 3
    assert set(recorded.dtypes) == {expected}
    assert recorded.embedding_bag_dtypes == [torch.float32]


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_sparse_decoder_steps_match_dense(architecture):
    def train(sparse_decoder: bool) -> tuple[SAETrainer, list[dict[str, float]]]:
        sae = SAE.from_config(SAEConfig(architecture=architecture, d_in=D_IN, d_sae=D_SAE, k=2))
        # A window of one batch: latents that did not fire in the previous step
        # count as dead, so AuxK can be active from the second step on.
        cfg = TrainerConfig(
            total_tokens=6 * 256,
            batch_size=256,
            lr=3e-3,
            log_every_steps=1,
            dead_latent_window=256,
            sparse_decoder=sparse_decoder,
        )
        logged: list[dict[str, float]] = []
        trainer = SAETrainer(sae, cfg, report_fn=lambda trainer, report: logged.append(report.metrics))
        trainer.fit(synthetic_stream(seed=4))
        return trainer, logged

    dense, dense_logged = train(sparse_decoder=False)
    sparse, sparse_logged = train(sparse_decoder=True)

    assert sparse.step == dense.step == 6
    assert any(metrics["auxiliary_reconstruction_loss"] > 0 for metrics in dense_logged)
    for sparse_metrics, dense_metrics in zip(sparse_logged, dense_logged, strict=True):
        for name in ("loss", "mse_loss", "auxiliary_reconstruction_loss", "l0", "dead_latents_frac"):
            assert sparse_metrics[name] == pytest.approx(dense_metrics[name], rel=1e-4, abs=1e-6), name
    for name, tensor in dense.sae.state_dict().items():
        torch.testing.assert_close(sparse.sae.state_dict()[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
