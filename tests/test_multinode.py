"""Placement on a simulated multi-node cluster: servers, trials and cross-node activations.

tests/cluster_sweep.py builds the cluster (a head, a CPU node with `activation_server`,
two nodes with one fake GPU each) and runs two sweeps on it in a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from ray import tune

from saesweep.experiment import parse_experiment
from saesweep.activations.models import model_info
from saesweep.sweep.placement import TrialPlacement, server_count, trial_resources

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("cluster_sweep.py")
TOKENS_PER_TRIAL = 4096


@pytest.fixture(scope="module")
def placement(tmp_path_factory) -> dict:
    output_dir = tmp_path_factory.mktemp("cluster")
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), str(output_dir)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-5000:]
    return json.loads((output_dir / "placement.json").read_text())


def test_remote_servers_run_on_server_node(placement):
    server_node = placement["nodes"]["server"]
    servers = placement["remote"]["servers"]
    assert len(servers) == 1
    assert servers[0]["node_id"] == server_node


def test_remote_trials_run_on_gpu_nodes(placement):
    gpu_nodes = {placement["nodes"]["gpu-a"], placement["nodes"]["gpu-b"]}
    trials = placement["remote"]["trials"]
    assert len(trials) == 4
    for trial in trials:
        assert trial["node_id"] in gpu_nodes, trial


def test_activations_cross_nodes(placement):
    remote = placement["remote"]
    for trial in remote["trials"]:
        assert trial["ok"], trial["error"]
        assert trial["tokens_trained"] == TOKENS_PER_TRIAL
        assert trial["heldout_eval_tokens"] == 512
        assert 0.0 < trial["heldout_explained_variance"] < 1.0
    # One forward pass feeds both hookpoints and all four trials; a forward pass per
    # trial would take at least 4 * TOKENS_PER_TRIAL tokens.
    assert remote["lm_forward_tokens"] < 3 * TOKENS_PER_TRIAL


def test_remote_sweep_registers_champions(placement):
    remote = placement["remote"]
    assert remote["mlflow_parent_run_id"]
    assert sorted(remote["registered"]) == ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"]


def test_colocated_servers_take_one_gpu_node_each(placement):
    servers = placement["colocated"]["servers"]
    gpu_nodes = {placement["nodes"]["gpu-a"], placement["nodes"]["gpu-b"]}
    assert {server["node_id"] for server in servers} == gpu_nodes


def test_trials_prefer_their_server_node(placement):
    colocated = placement["colocated"]
    server_of = {hookpoint: server["node_id"] for server in colocated["servers"] for hookpoint in server["hookpoints"]}
    assert len(colocated["trials"]) == 4
    for trial in colocated["trials"]:
        assert trial["ok"], trial["error"]
        assert trial["node_id"] == server_of[trial["hookpoint"]], trial


def placement_experiment(prefer: bool = True, servers: dict | None = None, layers: int = 1):
    return parse_experiment(
        {
            "name": "placement",
            "model": {"name": "smollm2-135m"},
            "data": {"dataset": "embedded", "context_size": 128},
            "hookpoints": {"layers": {"start": 0, "stop": layers}, "template": "blocks.{layer}.hook_resid_pre"},
            "search": {"architectures": ["topk"], "k": [8]},
            "servers": {"sequences_per_batch": 8, "max_batches_in_flight": 4, **(servers or {})},
            "tune": {"prefer_server_node": prefer, "resources_per_trial": {"cpu": 2, "gpu": 0.25}},
            "champion": {"l0_max": 100},
        }
    )


def test_trial_request_names_server_node():
    resources = trial_resources(placement_experiment(True), {"blocks.0.hook_resid_pre": "node-1"})
    assert isinstance(resources, TrialPlacement)
    factory = resources({"hookpoint": "blocks.0.hook_resid_pre"})
    assert isinstance(factory, tune.PlacementGroupFactory)
    assert factory.bundles == [{"CPU": 2.0, "GPU": 0.25}]
    assert factory.strategy == "STRICT_PACK"
    assert factory._kwargs == {"_soft_target_node_id": "node-1"}


def test_trial_request_without_server_node():
    resources = trial_resources(placement_experiment(True), {})
    factory = resources({"hookpoint": "blocks.0.hook_resid_pre"})
    assert factory.bundles == [{"CPU": 2.0, "GPU": 0.25}]
    assert factory._kwargs == {}


def test_trial_request_when_preference_off():
    resources = trial_resources(placement_experiment(False), {"blocks.0.hook_resid_pre": "node-1"})
    assert resources == {"CPU": 2.0, "GPU": 0.25}


# 4 batches x 8 windows x 128 tokens x 576 floats x 4 bytes per hookpoint of SmolLM2-135M.
HOOKPOINT_BATCH_GIB = 4 * 8 * 128 * 576 * 4 / 1024**3


def test_server_count_without_budget():
    exp = placement_experiment(layers=5, servers={"count": 2})
    assert server_count(exp, model_info("smollm2-135m")) == 2


def test_server_count_rises_to_fit_budget():
    # Two hookpoints fit one server's budget, so five need three servers.
    exp = placement_experiment(layers=5, servers={"count": 1, "max_batch_memory_gb": 2.5 * HOOKPOINT_BATCH_GIB})
    assert server_count(exp, model_info("smollm2-135m")) == 3


def test_server_count_keeps_larger_count():
    exp = placement_experiment(layers=5, servers={"count": 4, "max_batch_memory_gb": 2.5 * HOOKPOINT_BATCH_GIB})
    assert server_count(exp, model_info("smollm2-135m")) == 4


def test_server_budget_below_one_hookpoint_fails():
    exp = placement_experiment(layers=2, servers={"max_batch_memory_gb": 0.5 * HOOKPOINT_BATCH_GIB})
    with pytest.raises(ValueError, match="servers.max_batch_memory_gb"):
        server_count(exp, model_info("smollm2-135m"))
