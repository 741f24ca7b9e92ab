"""End-to-end sweeps on the embedded model and text, under a real local Ray."""

from __future__ import annotations

import json
from pathlib import Path

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
        "model": {"name": "smollm2-135m", "dtype": "float32"},
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
            "ce_eval_tokens": 256,
        },
        "tune": {"max_concurrent_trials": 3, "resources_per_trial": {"cpu": 0.25}},
        "servers": {
            "resources": {"cpu": 1},
            "sequences_per_batch": 8,
            "shuffle_buffer_tokens": 1024,
            "normalization_tokens": 1024,
        },
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
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


def test_trials_report_spliced_ce_scores(finished_sweep):
    _, result, _ = finished_sweep
    for trial in (t for t in result.trials if t.ok):
        metrics = trial.metrics
        assert metrics["heldout_ce_eval_tokens"] >= 256
        assert metrics["heldout_ce_loss_zero_ablated"] > metrics["heldout_ce_loss_clean"]
        assert metrics["heldout_kl_div_spliced"] >= 0.0
        expected = (metrics["heldout_ce_loss_zero_ablated"] - metrics["heldout_ce_loss_spliced"]) / (
            metrics["heldout_ce_loss_zero_ablated"] - metrics["heldout_ce_loss_clean"]
        )
        assert metrics["heldout_ce_loss_score"] == pytest.approx(expected)


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


def _mlflow_client(exp):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=exp.mlflow.resolve_tracking_uri(exp.output_dir))


def test_mlflow_has_one_parent_and_a_child_per_trial(finished_sweep):
    exp, result, _ = finished_sweep
    client = _mlflow_client(exp)
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]

    assert len(parents) == 1
    assert parents[0].info.run_id == result.mlflow_parent_run_id
    assert len(children) == 3
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {result.mlflow_parent_run_id}
    assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED", "FINISHED"]
    assert parents[0].data.metrics["lm_forward_tokens"] == result.lm_forward_tokens
    assert parents[0].data.metrics["trials_failed"] == 1
    assert parents[0].data.params["model.name"] == "smollm2-135m"
    assert not (__import__("pathlib").Path.cwd() / "mlruns").exists()


def test_mlflow_child_metrics_have_increasing_steps(finished_sweep):
    exp, _, _ = finished_sweep
    client = _mlflow_client(exp)
    experiment = client.get_experiment_by_name("tiny")
    children = client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'FINISHED' and tags.architecture != ''")
    children = [c for c in children if "mlflow.parentRunId" in c.data.tags]
    assert len(children) == 2
    for child in children:
        for tag in ("hookpoint", "architecture", "expansion_factor", "coefficient", "saesweep.tune_trial_id", "ray_node_id"):
            assert tag in child.data.tags, tag
        for name in ("explained_variance", "l0", "mse", "l1", "dead_latents_frac", "tokens_trained", "lr"):
            steps = [m.step for m in client.get_metric_history(child.info.run_id, name)]
            assert steps == sorted(set(steps)), (name, steps)
            assert len(steps) >= 2, name
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id, "sae")}
        assert artifacts == {"sae/cfg.json", "sae/sae_weights.safetensors", "sae/sparsity.safetensors"}


def test_champion_downloads_from_registry_and_reproduces_l0(finished_sweep, tmp_path, monkeypatch):
    import mlflow

    from saesweep.activations.models import load_model, model_info
    from saesweep.evaluation.heldout import heldout_activations, heldout_token_batches
    from saesweep.sweep.runner import _server_config
    from saesweep.training.metrics import evaluate_sae

    exp, result, _ = finished_sweep
    hookpoint = "blocks.2.hook_resid_pre"
    champion = result.champions[hookpoint]
    assert result.registered[hookpoint]["promoted"]
    uri = exp.mlflow.resolve_tracking_uri(exp.output_dir)
    # NOTE: mlflow 3.17 resolves models:/ URIs through the registry URI of the
    # environment even when registry_uri is passed, so the test sets both.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    folder = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/saesweep.smollm2-135m.{hookpoint}@champion",
        dst_path=str(tmp_path),
        tracking_uri=uri,
        registry_uri=uri,
    )
    ours = SAE.load_from_disk(folder)
    theirs = sae_lens.SAE.load_from_disk(folder)

    config = _server_config(exp, [hookpoint], "heldout")
    model, tokenizer = load_model(config.model, dtype=config.dtype)
    policy = model_info(config.model).token_policy()
    batches = heldout_token_batches(config, tokenizer, policy, exp.training.eval_tokens)
    activations = heldout_activations(model, batches, hookpoint, exp.training.eval_tokens, "cpu")
    metrics = evaluate_sae(ours, [activations])
    assert metrics.l0 == pytest.approx(champion.metrics["heldout_l0"], rel=1e-6)
    assert metrics.explained_variance == pytest.approx(champion.metrics["heldout_explained_variance"], rel=1e-5)
    torch.testing.assert_close(theirs(activations[:8]), ours(activations[:8]))


def test_rerun_archives_finished_sweep(tmp_path):
    from saesweep.sweep.runner import _archive_finished_sweep

    finished = tmp_path / "tune" / "done"
    finished.mkdir(parents=True)
    (finished / SUMMARY_FILENAME).write_text("{}")
    _archive_finished_sweep(finished, "done")
    assert not finished.exists()
    assert len(list((tmp_path / "tune").glob("done-*"))) == 1

    interrupted = tmp_path / "tune" / "partial"
    interrupted.mkdir()
    with pytest.raises(FileExistsError, match="unfinished sweep named 'partial'.*resume"):
        _archive_finished_sweep(interrupted, "partial")
    assert interrupted.exists()


@pytest.fixture(scope="module")
def champions_only_sweep(ray_session, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("champions-only")
    data = small_experiment(
        tmp_path, training={"eval_tokens": 512, "ce_eval_tokens": 256, "ce_eval_trials": "champions"}
    )
    data["name"] = "champions-only"
    data["search"] = {"architectures": ["topk"], "expansion_factors": [2], "k": [4, 16]}
    exp = parse_experiment(data)
    return exp, run_sweep(exp)


def test_spliced_scores_only_for_champion(champions_only_sweep):
    _, result = champions_only_sweep
    (champion,) = result.champions.values()
    others = [t for t in result.trials if t.trial_id != champion.trial_id]
    assert len(others) == 1
    assert 0.0 < champion.metrics["heldout_ce_loss_score"] < 1.0
    assert "heldout_ce_loss_score" not in others[0].metrics


def test_champion_spliced_scores_reach_mlflow(champions_only_sweep):
    exp, result = champions_only_sweep
    client = _mlflow_client(exp)
    (champion,) = result.champions.values()
    (registered,) = result.registered.values()
    version = client.get_model_version(registered["name"], registered["version"])
    assert float(version.tags["metric.heldout_ce_loss_score"]) == pytest.approx(champion.metrics["heldout_ce_loss_score"])
    run = client.get_run(version.run_id)
    assert run.data.metrics["heldout_ce_loss_score"] == pytest.approx(champion.metrics["heldout_ce_loss_score"])


@pytest.fixture(scope="module")
def packed_sweep(ray_session, tmp_path_factory):
    """The three SAEs of `small_experiment` trained together in one trial."""
    tmp_path = tmp_path_factory.mktemp("packed")
    data = small_experiment(tmp_path, tune={"saes_per_trial": 3}, training={"ce_eval_tokens": 0})
    data["name"] = "packed"
    exp = parse_experiment(data)
    lines: list[str] = []
    return exp, run_sweep(exp, write=lines.append), lines


def test_packed_trial_isolates_diverging_sae(packed_sweep):
    _, result, _ = packed_sweep
    assert len(result.trials) == 3
    trial_ids = {t.trial_id.rsplit("-", 1)[0] for t in result.trials}
    assert len(trial_ids) == 1
    (failed,) = [t for t in result.trials if not t.ok]
    assert failed.config["l1_coefficient"] == pytest.approx(1.0e40)
    assert "TrainingDivergedError" in failed.error
    done = [t for t in result.trials if t.ok]
    assert sorted(t.config["architecture"] for t in done) == ["standard", "topk"]
    for trial in done:
        assert trial.metrics["tokens_trained"] == 6144
        assert trial.metrics["heldout_eval_tokens"] >= 1024
        assert 0.0 < trial.metrics["heldout_explained_variance"] <= 1.0
    topk = next(t for t in done if t.config["architecture"] == "topk")
    assert topk.metrics["heldout_l0"] == pytest.approx(16.0)
    (folder,) = (path.name for path in Path(result.tune_path).iterdir() if path.is_dir())
    assert folder == f"pack_{trial_ids.pop()}"
    # One trial reads the stream once for all of its SAEs.
    assert result.lm_forward_tokens < 6144 + 8 * 64 * 8
    assert result.tokens_trained == 2 * 6144


def test_packed_saes_load_in_saelens_and_differ(packed_sweep):
    _, result, _ = packed_sweep
    x = torch.randn(5, 576)
    outputs = []
    for trial in (t for t in result.trials if t.ok):
        ours = SAE.load_from_disk(trial.sae_path)
        theirs = sae_lens.SAE.load_from_disk(trial.sae_path)
        assert ours.cfg.architecture == trial.config["architecture"]
        assert ours.cfg.metadata["tune_trial_id"] == trial.trial_id
        torch.testing.assert_close(theirs(x), ours(x))
        outputs.append(ours(x))
    assert not torch.allclose(outputs[0], outputs[1])


def test_packed_saes_own_mlflow_runs(packed_sweep):
    exp, result, _ = packed_sweep
    client = _mlflow_client(exp)
    experiment = client.get_experiment_by_name("packed")
    children = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    by_id = {c.data.tags["saesweep.tune_trial_id"]: c for c in children}
    assert set(by_id) == {t.trial_id for t in result.trials}
    for trial in result.trials:
        run = by_id[trial.trial_id]
        assert run.info.status == ("FINISHED" if trial.ok else "FAILED")
        assert run.data.tags["architecture"] == trial.config["architecture"]
        if trial.ok:
            assert run.data.metrics["heldout_explained_variance"] == pytest.approx(
                trial.metrics["heldout_explained_variance"]
            )
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "l0")]
            assert steps == sorted(set(steps))
            assert len(steps) >= 2
        else:
            assert "TrainingDivergedError" in run.data.tags["saesweep.error"]
    (champion,) = result.champions.values()
    assert champion.ok
    (registered,) = result.registered.values()
    version = client.get_model_version(registered["name"], registered["version"])
    assert version.run_id == by_id[champion.trial_id].info.run_id

