"""The MLflow UI shows a sweep: a real `mlflow server` on 127.0.0.1, its REST API, and a Chromium screenshot."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch

from saesweep import SAE, SAEConfig
from saesweep.tracking.runs import SweepTracker, TrialTracker
from saesweep.tracking.settings import TrackingSettings

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "mlflow_screenshot.py"
EXPERIMENT = "ui-sweep"
TRIALS = {
    "trial_0001": {"hookpoint": "blocks.2.hook_resid_pre", "architecture": "topk", "expansion_factor": 4, "k": 16},
    "trial_0002": {"hookpoint": "blocks.2.hook_resid_pre", "architecture": "standard", "expansion_factor": 4, "l1_coefficient": 1.0},
    "trial_0003": {"hookpoint": "blocks.4.hook_resid_pre", "architecture": "topk", "expansion_factor": 8, "k": 32},
}
STEPS = (4, 8, 12)


def load_script():
    spec = importlib.util.spec_from_file_location("mlflow_screenshot", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


screenshot = load_script()


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a SQLite store, stopped after the module."""
    root = tmp_path_factory.mktemp("mlflow-server")
    url = f"http://127.0.0.1:{screenshot.free_port()}"
    process = screenshot.start_mlflow_server(
        f"sqlite:///{root / 'mlflow.db'}", str(root / "artifacts"), int(url.rsplit(":", 1)[1]), root / "server.log"
    )
    try:
        screenshot.wait_for_server(url, 180, process)
        yield url
    finally:
        screenshot.stop_process_group(process)
    assert process.poll() is not None


@pytest.fixture(scope="module")
def sweep_runs(server_url, tmp_path_factory):
    """One parent run and three nested trial runs, logged through the server by the sweep's trackers."""
    root = tmp_path_factory.mktemp("sweep")
    settings = TrackingSettings(tracking_uri=server_url, experiment_name=EXPERIMENT, artifact_location=None)
    parent = SweepTracker(settings, root / "tune")
    parent_id = parent.start("ui-sweep", {"name": EXPERIMENT, "model": {"name": "smollm2-135m"}}, resume=False)

    sae = SAE.from_config(SAEConfig(architecture="topk", d_in=16, d_sae=64, k=4, hook_name="blocks.2.hook_resid_pre"))
    sae.save_model(root / "sae", sparsity=torch.full((64,), -2.0))
    children = {}
    for index, (trial_id, config) in enumerate(TRIALS.items()):
        tags = {key: value for key, value in config.items()}
        child = TrialTracker(settings, parent_id, trial_id, run_name=trial_id, tags=tags, params={"sae": config})
        for step in STEPS:
            child.log_metrics(step, {"l0": 10.0 + index + step, "explained_variance": 0.1 * index + 0.01 * step})
        child.log_sae(root / "sae")
        child.finish()
        children[trial_id] = child.run_id
    parent.finish(failed=False)
    return {"parent": parent_id, "children": children}


def search_runs(url: str) -> list[dict]:
    experiment = screenshot.rest_get(url, "experiments/get-by-name", {"experiment_name": EXPERIMENT})["experiment"]
    return screenshot.rest_post(url, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]


def tags_of(run: dict) -> dict[str, str]:
    return {tag["key"]: tag["value"] for tag in run["data"].get("tags", [])}


def test_rest_api_finds_runs_nested(server_url, sweep_runs):
    runs = search_runs(server_url)
    parents = [run for run in runs if "mlflow.parentRunId" not in tags_of(run)]
    children = [run for run in runs if "mlflow.parentRunId" in tags_of(run)]

    assert len(runs) == 4
    assert [run["info"]["run_id"] for run in parents] == [sweep_runs["parent"]]
    assert sorted(run["info"]["run_name"] for run in children) == sorted(TRIALS)
    for run in children:
        assert tags_of(run)["mlflow.parentRunId"] == sweep_runs["parent"]
        assert run["info"]["status"] == "FINISHED"


def test_rest_api_child_tags_and_metrics(server_url, sweep_runs):
    runs = {run["info"]["run_name"]: run for run in search_runs(server_url)}
    for trial_id, config in TRIALS.items():
        tags = tags_of(runs[trial_id])
        assert tags["saesweep.tune_trial_id"] == trial_id
        assert tags["hookpoint"] == config["hookpoint"]
        assert tags["architecture"] == config["architecture"]
        history = screenshot.rest_get(
            server_url, "metrics/get-history", {"run_id": sweep_runs["children"][trial_id], "metric_key": "l0"}
        )["metrics"]
        assert [point["step"] for point in history] == list(STEPS)


def test_rest_api_lists_sae_artifacts(server_url, sweep_runs):
    run_id = sweep_runs["children"]["trial_0001"]
    listed = screenshot.rest_get(server_url, "artifacts/list", {"run_id": run_id, "path": "sae"})["files"]

    assert sorted(entry["path"] for entry in listed) == [
        "sae/cfg.json",
        "sae/sae_weights.safetensors",
        "sae/sparsity.safetensors",
    ]


@pytest.mark.skipif(screenshot.find_chromium() is None, reason="Chromium is not installed (apt-get install -y chromium)")
def test_screenshot_shows_parent_with_children(server_url, sweep_runs, tmp_path):
    output = tmp_path / "experiment.png"
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--url", server_url, "--experiment", EXPERIMENT, "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["runs"] == sorted(["ui-sweep", *TRIALS])
    # The children are listed only when their parent's row is expanded.
    assert result["visible_runs"] == result["runs"]
    assert result["metric_columns"] == ["explained_variance", "l0"]
    image = matplotlib.image.imread(output)
    assert image.shape[:2] == (1000, 1800)
    # A rendered page, not a blank one: many distinct pixel values.
    assert len({tuple(pixel) for pixel in image[::10, ::10].reshape(-1, image.shape[-1]).tolist()}) > 20


def test_screenshot_script_rejects_bad_arguments(tmp_path):
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--experiment", EXPERIMENT, "--output", str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert completed.returncode == 2
    assert "pass exactly one of --url and --backend-store-uri" in completed.stderr
