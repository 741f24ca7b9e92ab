"""MLflow tracking against a real SQLite store: concurrent writers, resumed runs, secrets."""

from __future__ import annotations

import multiprocessing

import pytest
from mlflow.tracking import MlflowClient

from saesweep.experiment import parse_experiment
from saesweep.tracking.champions import choose_champions, describe_policy, policy_score
from saesweep.tracking.runs import SweepTracker, TrialTracker
from saesweep.tracking.settings import REDACTED, TrackingSettings, enable_sqlite_wal, redact, tracking_settings

N_WRITERS = 8
N_STEPS = 25
METRICS = ("explained_variance", "l0", "mse", "l1", "dead_latents_frac", "tokens_trained", "lr")


def _settings(tmp_path) -> TrackingSettings:
    return TrackingSettings(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        experiment_name="concurrency",
        artifact_location=(tmp_path / "artifacts").as_uri(),
    )


def _write_trial(settings: TrackingSettings, parent_run_id: str, index: int) -> None:
    tracker = TrialTracker(
        settings, parent_run_id, f"trial_{index}", run_name=f"trial {index}", tags={"hookpoint": "h"}, params={"i": index}
    )
    for step in range(1, N_STEPS + 1):
        tracker.log_metrics(step, {name: step * 0.01 + index for name in METRICS})
    tracker.finish()


def test_eight_processes_log_to_one_sqlite_store(tmp_path):
    settings = _settings(tmp_path)
    parent = SweepTracker(settings, tmp_path / "tune")
    parent_run_id = parent.start("concurrency", {"name": "concurrency"}, resume=False)
    enable_sqlite_wal(settings.tracking_uri)

    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_write_trial, args=(settings, parent_run_id, i)) for i in range(N_WRITERS)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    assert [p.exitcode for p in processes] == [0] * N_WRITERS

    children = parent.child_runs()
    assert len(children) == N_WRITERS
    client = MlflowClient(settings.tracking_uri)
    for trial_id, run_id in children.items():
        index = int(trial_id.split("_")[1])
        for name in METRICS:
            history = client.get_metric_history(run_id, name)
            assert [m.step for m in history] == list(range(1, N_STEPS + 1)), (trial_id, name)
            assert history[-1].value == pytest.approx(N_STEPS * 0.01 + index)


def test_resumed_trial_continues_its_run_without_duplicate_steps(tmp_path):
    settings = _settings(tmp_path)
    parent_run_id = SweepTracker(settings, tmp_path / "tune").start("s", {"name": "s"}, resume=False)
    first = TrialTracker(settings, parent_run_id, "t0", run_name="t0", tags={}, params={})
    for step in (10, 20, 30):
        first.log_metrics(step, {"l0": float(step), "tokens_trained": float(step)})

    # A resumed trial restarts from its checkpoint at step 20 and logs 30 again.
    second = TrialTracker(settings, parent_run_id, "t0", run_name="t0", tags={}, params={})
    assert second.run_id == first.run_id
    for step in (30, 40):
        second.log_metrics(step, {"l0": float(step), "tokens_trained": float(step)})
    history = MlflowClient(settings.tracking_uri).get_metric_history(first.run_id, "l0")
    assert [m.step for m in history] == [10, 20, 30, 40]


def test_resumed_sweep_reuses_parent_run(tmp_path):
    settings = _settings(tmp_path)
    first = SweepTracker(settings, tmp_path / "tune").start("s", {"name": "s"}, resume=False)
    again = SweepTracker(settings, tmp_path / "tune").start("s", {"name": "s"}, resume=True)
    assert again == first


def test_secrets_are_redacted():
    options = {"revision": "main", "token": "hf_secret", "nested": {"api_key": "k", "x": 1}}
    cleaned = redact(options)
    assert cleaned == {"revision": "main", "token": REDACTED, "nested": {"api_key": REDACTED, "x": 1}}
    assert "hf_secret" not in repr(cleaned)


def test_default_store_keeps_artifacts_beside_database(tmp_path):
    exp = parse_experiment(
        {
            "name": "store",
            "hookpoints": {"names": ["blocks.0.hook_resid_pre"]},
            "champion": {"l0_max": 10},
            "search": {"architectures": ["topk"], "k": [8]},
            "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"},
            "output_dir": str(tmp_path / "out"),
        },
        check_model=False,
    )
    settings = tracking_settings(exp)
    assert settings.artifact_location == (tmp_path / "db" / "mlartifacts").as_uri()


class _Outcome:
    def __init__(self, trial_id, hookpoint, ev, l0, ok=True):
        self.trial_id = trial_id
        self.config = {"hookpoint": hookpoint}
        self.metrics = {"heldout_explained_variance": ev, "heldout_l0": l0, "explained_variance": 0.0}
        self.ok = ok


def test_champion_policy_uses_heldout_metrics_and_l0_limit():
    exp = parse_experiment(
        {
            "name": "c",
            "hookpoints": {"names": ["blocks.0.hook_resid_pre"]},
            "search": {"architectures": ["topk"], "k": [8]},
            "champion": {"l0_max": 50},
        },
        check_model=False,
    )
    outcomes = [
        _Outcome("a", "h1", 0.9, 80),  # best EV but L0 above the limit
        _Outcome("b", "h1", 0.7, 40),
        _Outcome("c", "h1", 0.8, 45),
        _Outcome("d", "h2", 0.99, 10, ok=False),  # failed trials never win
        _Outcome("e", "h2", 0.5, 10),
    ]
    champions = choose_champions(outcomes, exp.champion)
    assert {h: o.trial_id for h, o in champions.items()} == {"h1": "c", "h2": "e"}
    assert policy_score(outcomes[0].metrics, exp.champion) is None
    assert "l0 <= 50" in describe_policy(exp.champion)


def test_champion_alias_moves_only_when_better(tmp_path):
    from saesweep import SAE, SAEConfig
    from saesweep.tracking.champions import register_champions

    settings = _settings(tmp_path)
    exp = parse_experiment(
        {
            "name": "c",
            "hookpoints": {"names": ["blocks.0.hook_resid_pre"]},
            "search": {"architectures": ["topk"], "k": [8]},
            "champion": {"l0_max": 50},
        },
        check_model=False,
    )
    sae_folder = SAE.from_config(SAEConfig(architecture="topk", d_in=8, d_sae=16, k=4)).save_model(tmp_path / "sae")

    def sweep(trial_id: str, explained_variance: float) -> dict:
        tracker = SweepTracker(settings, tmp_path / f"tune_{trial_id}")
        parent_run_id = tracker.start(trial_id, {"name": trial_id}, resume=False)
        child = TrialTracker(settings, parent_run_id, trial_id, run_name=trial_id, tags={}, params={})
        child.log_sae(sae_folder)
        outcome = _Outcome(trial_id, "h", explained_variance, 8)
        return register_champions(
            tracker.client,
            experiment="c",
            model_name="m",
            champions={"h": outcome},
            child_runs=tracker.child_runs(),
            policy=exp.champion,
        )["h"]

    client = MlflowClient(settings.tracking_uri)
    first = sweep("first", 0.5)
    assert int(first["version"]) == 1
    assert first["promoted"] is True
    worse = sweep("worse", 0.4)
    assert worse["promoted"] is False
    assert int(client.get_model_version_by_alias("saesweep.m.h", "champion").version) == 1
    better = sweep("better", 0.7)
    assert better["promoted"] is True
    champion = client.get_model_version_by_alias("saesweep.m.h", "champion")
    assert int(champion.version) == 2
    assert float(champion.tags["metric.heldout_explained_variance"]) == pytest.approx(0.7)
    assert len(client.search_model_versions("name = 'saesweep.m.h'")) == 2
