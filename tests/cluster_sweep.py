"""Run two small sweeps on a simulated multi-node Ray cluster and write where everything ran.

tests/test_multinode.py runs this script in a subprocess, because a process holds one
Ray connection and the rest of the test session shares a local instance.

The cluster (`ray.cluster_utils.Cluster`, every node a set of processes on 127.0.0.1):

- head: 1 CPU, runs the driver;
- server: 2 CPUs and `activation_server: 2`, no GPU;
- gpu-a and gpu-b: 3 CPUs and 1 fake GPU each, and `colocated_server: 1`.

The "remote" sweep starts one activation server (and the held-out evaluation server)
with `activation_server`, so both land on the server node, while the trials ask for
half a GPU and can only run on gpu-a or gpu-b: every activation crosses nodes. The
"colocated" sweep starts two servers with `colocated_server`, one per GPU node, and
each GPU node has room for exactly the two trials of its server's hookpoint.

Usage: python tests/cluster_sweep.py OUTPUT_DIR (writes OUTPUT_DIR/placement.json)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from saesweep import raycluster  # noqa: E402
from saesweep.experiment import parse_experiment  # noqa: E402
from saesweep.sweep.runner import run_sweep  # noqa: E402

HOOKPOINTS = ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"]
TOKENS_PER_TRIAL = 4096
OBJECT_STORE_BYTES = 100 * 1024**2


def experiment(output_dir: Path, name: str, servers: dict, training: dict, mlflow: dict) -> dict:
    """Four topk trials (two per hookpoint), each on half a GPU."""
    return {
        "name": name,
        "model": {"name": "smollm2-135m", "dtype": "float32"},
        "data": {"dataset": "embedded", "context_size": 64},
        "hookpoints": {"names": HOOKPOINTS},
        "sae": {"normalize_activations": "expected_average_only_in"},
        "search": {"architectures": ["topk"], "expansion_factors": [2], "k": [8, 16]},
        "training": {
            "tokens_per_trial": TOKENS_PER_TRIAL,
            "batch_size_tokens": 512,
            "lr": 1.0e-3,
            "log_every_steps": 4,
            "checkpoint_every_steps": 0,
            "dead_latent_window_tokens": 2048,
            **training,
        },
        "tune": {"max_concurrent_trials": 4, "resources_per_trial": {"cpu": 1, "gpu": 0.5}},
        "servers": {
            "sequences_per_batch": 8,
            "shuffle_buffer_tokens": 1024,
            "normalization_tokens": 1024,
            **servers,
        },
        "mlflow": mlflow,
        "champion": {"l0_max": 100},
        "output_dir": str(output_dir / name),
    }


def summary(result) -> dict:
    return {
        "servers": [{"node_id": s["node_id"], "hookpoints": s["hookpoints"]} for s in result.server_stats],
        "trials": [
            {
                "hookpoint": t.config["hookpoint"],
                "ok": t.ok,
                "error": t.error,
                "node_id": t.metrics.get("node_id"),
                "tokens_trained": t.metrics.get("tokens_trained"),
                "heldout_eval_tokens": t.metrics.get("heldout_eval_tokens"),
                "heldout_explained_variance": t.metrics.get("heldout_explained_variance"),
            }
            for t in result.trials
        ],
        "lm_forward_tokens": result.lm_forward_tokens,
        "mlflow_parent_run_id": result.mlflow_parent_run_id,
        "registered": result.registered,
    }


def main(output_dir: Path) -> None:
    raycluster.bind_local_ray_to_loopback()
    node_args = {"object_store_memory": OBJECT_STORE_BYTES}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, **node_args},
    )
    try:
        nodes = {
            "head": cluster.head_node.node_id,
            "server": cluster.add_node(num_cpus=2, resources={"activation_server": 2}, **node_args).node_id,
            "gpu-a": cluster.add_node(num_cpus=3, num_gpus=1, resources={"colocated_server": 1}, **node_args).node_id,
            "gpu-b": cluster.add_node(num_cpus=3, num_gpus=1, resources={"colocated_server": 1}, **node_args).node_id,
        }
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)

        remote = run_sweep(
            parse_experiment(
                experiment(
                    output_dir,
                    "remote",
                    servers={"count": 1, "resources": {"cpu": 1, "custom": {"activation_server": 1}}},
                    training={"eval_tokens": 512},
                    mlflow={"tracking_uri": f"sqlite:///{output_dir / 'mlflow.db'}"},
                )
            )
        )
        colocated = run_sweep(
            parse_experiment(
                experiment(
                    output_dir,
                    "colocated",
                    servers={"count": 2, "resources": {"cpu": 1, "custom": {"colocated_server": 1}}},
                    training={"eval_tokens": 0},
                    mlflow={"enabled": False},
                )
            )
        )
        report = {"nodes": nodes, "remote": summary(remote), "colocated": summary(colocated)}
        (output_dir / "placement.json").write_text(json.dumps(report, indent=2))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
