"""End-to-end sweeps on the embedded model and text, under a real local Ray."""

from __future__ import annotations

import json

import pytest
import sae_lens
import torch

from saesweep import SAE
from saesweep.experiment import parse_experiment
from saesweep.sweep.runner import SUMMARY_FILENAME, run_sweep

pytestmark = pytest.mark.slow


def small_experiment(tmp_path, **sections) -> dict:
    """A sweep of 3 small trials on one hookpoint of the embedded model."""
    data = {
        "name": "tiny",
        "model": {"name": "smollm2-135m", "dtype": "bfloat16"},
        "data": {"dataset": "embedded", "context_size": 64},
        "hookpoints": {"names": ["blocks.2.hook_resid_pre"]},
        "sae": {"normalize_activations": "expected_average_only_in"},
        "search": {
            "architectures": ["topk", "standard"],
            "expansion_factors": [2],
            "k": [16],
            "l1_coefficient": [1.0, 1.0e40],
        },
        "training": {
            "tokens_per_trial": 6144,
            "batch_size_tokens": 512,
            "lr": 1.0e-3,
            "log_every_steps": 4,
            "checkpoint_every_steps": 6,
            "dead_latent_window_tokens": 4096,
            "eval_tokens": 1024,
        },
        "tune": {"max_concurrent_trials": 3, "resources_per_trial": {"cpu": 0.25}},
        "servers": {
            "resources": {"cpu": 1},
            "sequences_per_batch": 8,
            "shuffle_buffer_tokens": 1024,
            "normalization_tokens": 1024,
        },
        "mlflow": {"enabled": False},
        "champion": {"l0_max": 100},
        "output_dir": str(tmp_path / "results"),
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return data


@pytest.fixture(scope="module")
def finished_sweep(ray_session, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sweep")
    exp = parse_experiment(small_experiment(tmp_path))
    lines: list[str] = []
    return exp, run_sweep(exp, write=lines.append), lines


def test_sweep_runs_every_trial(finished_sweep):
    _, result, _ = finished_sweep
    assert len(result.trials) == 3
    done = [t for t in result.trials if t.ok]
    assert sorted(t.config["architecture"] for t in done) == ["standard", "topk"]


def test_diverging_trial_fails_alone_with_reason(finished_sweep):
    _, result, lines = finished_sweep
    failed = [t for t in result.trials if not t.ok]
    assert len(failed) == 1
    assert failed[0].config["l1_coefficient"] == pytest.approx(1.0e40)
    assert "TrainingDivergedError" in failed[0].error
    assert "lower the learning rate or the sparsity coefficient" in failed[0].error
    assert any("failed" in line for line in lines)


def test_trials_report_required_metrics(finished_sweep):
    _, result, _ = finished_sweep
    for trial in (t for t in result.trials if t.ok):
        for name in ("explained_variance", "l0", "mse", "dead_latents_frac", "tokens_trained"):
            assert name in trial.metrics, name
        assert trial.metrics["tokens_trained"] == 6144
        assert trial.metrics["heldout_eval_tokens"] >= 1024


def test_topk_trial_keeps_k_on_heldout_text(finished_sweep):
    _, result, _ = finished_sweep
    topk = next(t for t in result.trials if t.ok and t.config["architecture"] == "topk")
    assert topk.metrics["heldout_l0"] == pytest.approx(16.0)
    assert topk.metrics["heldout_explained_variance"] > 0.0


def test_saved_saes_load_in_saelens(finished_sweep):
    _, result, _ = finished_sweep
    x = torch.randn(5, 576)
    for trial in (t for t in result.trials if t.ok):
        ours = SAE.load_from_disk(trial.sae_path)
        theirs = sae_lens.SAE.load_from_disk(trial.sae_path)
        assert ours.cfg.hook_name == "blocks.2.hook_resid_pre"
        assert ours.cfg.model_name == "smollm2-135m"
        assert ours.cfg.normalize_activations == "none"
        torch.testing.assert_close(theirs(x), ours(x))


def test_activations_are_shared_across_trials(finished_sweep):
    _, result, _ = finished_sweep
    # Three trials read one stream: the forward tokens stay near one trial's
    # consumption (plus the shuffle buffer and batches held in flight).
    assert result.lm_forward_tokens < 2 * 6144 + 8 * 64 * 8
    assert result.tokens_trained >= 2 * 6144


def test_summary_written(finished_sweep):
    _, result, _ = finished_sweep
    summary = json.loads((__import__("pathlib").Path(result.tune_path) / SUMMARY_FILENAME).read_text())
    assert summary["lm_forward_tokens"] == result.lm_forward_tokens
    assert len(summary["trials"]) == 3
