"""Metric definitions: explained variance about the mean, MSE per token, L0, dead latents."""

from __future__ import annotations

import math

import pytest
import torch

from saesweep.training.metrics import FiringTracker, ReconstructionAccumulator


@pytest.fixture
def offset_data() -> torch.Tensor:
    """[1000, 16] activations with a large constant offset, as residual streams have."""
    generator = torch.Generator().manual_seed(0)
    return 500.0 + torch.randn(1000, 16, generator=generator) * torch.linspace(0.5, 2.0, 16)


def _explained_variance(x: torch.Tensor, x_hat: torch.Tensor, n_batches: int = 1) -> float:
    accumulator = ReconstructionAccumulator(x.shape[-1])
    for x_part, x_hat_part in zip(x.chunk(n_batches), x_hat.chunk(n_batches)):
        accumulator.update(x_part, x_hat_part)
    return accumulator.compute().explained_variance


def test_predicting_the_mean_explains_nothing(offset_data):
    mean = offset_data.mean(dim=0, keepdim=True).expand_as(offset_data)
    assert _explained_variance(offset_data, mean) == pytest.approx(0.0, abs=1e-9)


def test_perfect_reconstruction_explains_everything(offset_data):
    assert _explained_variance(offset_data, offset_data.clone()) == pytest.approx(1.0, abs=1e-12)


def test_explained_variance_independent_of_batching(offset_data):
    noisy = offset_data + 0.3 * torch.randn(offset_data.shape, generator=torch.Generator().manual_seed(1))
    one = _explained_variance(offset_data, noisy, n_batches=1)
    ten = _explained_variance(offset_data, noisy, n_batches=10)
    assert one == pytest.approx(ten, rel=1e-12)
    assert 0.0 < one < 1.0


def test_explained_variance_is_not_average_of_batch_ratios():
    # Two batches with different means: the per-batch ratio average differs from
    # the variance about the global mean.
    x = torch.cat([torch.zeros(10, 4), torch.ones(10, 4) * 10])
    x_hat = x.mean(dim=0, keepdim=True).expand_as(x)
    assert _explained_variance(x, x_hat, n_batches=2) == pytest.approx(0.0, abs=1e-12)


def test_mse_is_per_token_and_batch_size_independent(offset_data):
    error = torch.full_like(offset_data, 0.5)
    for n_batches in (1, 7, 50):
        accumulator = ReconstructionAccumulator(16)
        for x_part, e_part in zip(offset_data.chunk(n_batches), error.chunk(n_batches)):
            accumulator.update(x_part, x_part + e_part)
        # 16 dimensions x 0.25 squared error each, summed per token
        assert accumulator.compute().mse == pytest.approx(4.0)


def test_l0_and_l1_are_means_over_tokens():
    accumulator = ReconstructionAccumulator(2)
    acts = torch.tensor([[0.0, 2.0, -1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 3.0]])
    accumulator.update(torch.randn(4, 2), torch.randn(4, 2), acts)
    metrics = accumulator.compute()
    assert metrics.l0 == pytest.approx((2 + 0 + 3 + 1) / 4)
    assert metrics.l1 == pytest.approx((3 + 0 + 3 + 3) / 4)


def test_dead_latents_need_a_full_window():
    tracker = FiringTracker(d_sae=3, window_tokens=100)
    fires_first = torch.tensor([[1.0, 0.0, 0.0]] * 10)
    tracker.update(fires_first)
    assert tracker.dead_fraction() == 0.0  # 10 tokens < window
    for _ in range(9):
        tracker.update(torch.tensor([[0.0, 1.0, 0.0]] * 10))
    # latent 0 fired 90 tokens ago, latent 1 just now, latent 2 never in 100 tokens
    assert tracker.dead_mask().tolist() == [False, False, True]
    tracker.update(torch.zeros(10, 3))
    assert tracker.dead_mask().tolist() == [True, False, True]


def test_dense_latents_and_log_density():
    tracker = FiringTracker(d_sae=2, window_tokens=10, dense_threshold=0.5)
    tracker.update(torch.tensor([[1.0, 0.0]] * 8 + [[1.0, 1.0]] * 2))
    assert tracker.dense_fraction() == 0.5
    density = tracker.log10_density()
    assert float(density[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(density[1]) == pytest.approx(math.log10(0.2), abs=1e-6)
