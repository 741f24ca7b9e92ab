"""The cluster-launcher configs: Ray's own validation, and room for the GPT-2 sweep.

Validation runs `prepare_config` then `validate_config` from
`ray.autoscaler._private.util`, the steps `ray up` takes before it contacts the
cloud. For AWS, `prepare_config` only merges Ray's bundled defaults.yaml. The
cloud steps (IAM role, key pair, subnets, security group, default AMI, instance
resources) happen later in `ray up` through boto3 and are not run here. The
tests block every network connection and hide AWS credentials while they run.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from saesweep.experiment import load_experiment
from saesweep.sweep.space import count_trials

REPO = Path(__file__).resolve().parents[1]
AWS_CONFIG = REPO / "cluster.yaml"
ONPREM_CONFIG = REPO / "cluster-onprem.yaml"
GPT2_EXPERIMENT = REPO / "experiments" / "gpt2_all_layers.yaml"
TRACKING_EXPORT = "export MLFLOW_TRACKING_URI="


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Fail any network connection, and hide AWS credentials and config files."""

    def reject_connection(*args, **kwargs):
        raise AssertionError(f"network access during cluster-config validation: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", reject_connection)
    monkeypatch.setattr(socket.socket, "connect_ex", reject_connection)
    monkeypatch.setattr(socket, "create_connection", reject_connection)
    monkeypatch.setattr(socket, "getaddrinfo", reject_connection)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "missing-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "missing-aws-credentials"))


def load_raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def prepared(path: Path) -> dict:
    """Run Ray's default filling and validation on the config at `path`, and return it."""
    config = prepare_config(load_raw(path))
    validate_config(config)
    return config


@pytest.fixture(scope="module")
def experiment():
    # check_model=False: reading GPT-2's config would need the Hugging Face Hub.
    return load_experiment(GPT2_EXPERIMENT, check_model=False)


# --- Ray's validation -------------------------------------------------------


def test_aws_config_passes_ray_validation(offline):
    config = prepared(AWS_CONFIG)

    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]


def test_onprem_config_passes_ray_validation(offline):
    config = prepared(ONPREM_CONFIG)

    assert config["provider"]["type"] == "local"
    assert config["provider"]["head_ip"]
    assert len(config["provider"]["worker_ips"]) >= 1
    # prepare_config turns worker_ips into the one node type of a local cluster.
    assert list(config["available_node_types"]) == [config["head_node_type"]]
    node_type = config["available_node_types"][config["head_node_type"]]
    assert node_type["max_workers"] == len(config["provider"]["worker_ips"])


@pytest.mark.parametrize("path", [AWS_CONFIG, ONPREM_CONFIG], ids=["aws", "onprem"])
def test_config_with_unknown_field_fails(offline, path):
    config = load_raw(path)
    config["max_wokers"] = 3

    with pytest.raises(Exception, match="max_wokers"):
        validate_config(prepare_config(config))


# --- Nodes, commands and mounts -----------------------------------------------


@pytest.mark.parametrize("path", [AWS_CONFIG, ONPREM_CONFIG], ids=["aws", "onprem"])
def test_every_node_exports_tracking_uri(offline, path):
    config = prepared(path)

    head = " ".join(config["head_setup_commands"])
    workers = " ".join(config["worker_setup_commands"])
    assert TRACKING_EXPORT in head
    assert TRACKING_EXPORT in workers
    assert "$RAY_HEAD_IP:5000" in workers


@pytest.mark.parametrize("path", [AWS_CONFIG, ONPREM_CONFIG], ids=["aws", "onprem"])
def test_mlflow_server_binds_private_address(offline, path):
    config = prepared(path)

    (server,) = [command for command in config["head_start_ray_commands"] if "mlflow server" in command]
    assert "--host \"$(hostname -I | awk '{print $1}')\"" in server
    assert "0.0.0.0" not in server
    assert "--backend-store-uri \"postgresql://" in server
    assert "--artifacts-destination" in server


@pytest.mark.parametrize("path", [AWS_CONFIG, ONPREM_CONFIG], ids=["aws", "onprem"])
def test_setup_installs_cuda_torch_before_saesweep(offline, path):
    commands = prepared(path)["setup_commands"]

    torch_steps = [i for i, command in enumerate(commands) if "torch==" in command and "--index-url" in command]
    saesweep_steps = [i for i, command in enumerate(commands) if "pip install -e ~/saesweep" in command]
    assert len(torch_steps) == 1
    assert "download.pytorch.org/whl/cu" in commands[torch_steps[0]]
    assert len(saesweep_steps) == 1
    assert torch_steps[0] < saesweep_steps[0]


@pytest.mark.parametrize("path", [AWS_CONFIG, ONPREM_CONFIG], ids=["aws", "onprem"])
def test_file_mounts_carry_repo_and_experiments(offline, path):
    mounts = prepared(path)["file_mounts"]

    for remote, local in mounts.items():
        assert (REPO / local).is_dir(), f"file_mounts[{remote!r}] = {local!r} is not a folder of the repository"
    assert mounts["~/saesweep"] == "."
    assert (REPO / mounts["~/saesweep/experiments"] / GPT2_EXPERIMENT.name).is_file()


def test_head_node_has_no_gpu_or_server_slot(offline):
    config = prepared(AWS_CONFIG)

    head = config["available_node_types"][config["head_node_type"]]["resources"]
    assert head.get("GPU", 0) == 0
    assert head.get("activation_server", 0) == 0


def test_onprem_workers_declare_server_slots(offline, experiment):
    start = " ".join(prepared(ONPREM_CONFIG)["worker_start_ray_commands"])

    for name in experiment.servers.resources.custom:
        assert f'\\"{name}\\"' in start
    assert '--resources="$RESOURCES"' in start


# --- Room for experiments/gpt2_all_layers.yaml ----------------------------------


@dataclass
class Node:
    """One node the autoscaler may launch, with the resources still free on it."""

    node_type: str
    free: dict[str, float]
    placed: list[str] = field(default_factory=list)

    def fits(self, request: dict[str, float]) -> bool:
        return all(self.free.get(name, 0.0) >= amount for name, amount in request.items() if amount > 0)

    def take(self, label: str, request: dict[str, float]) -> None:
        for name, amount in request.items():
            self.free[name] = self.free.get(name, 0.0) - amount
        self.placed.append(label)


def sweep_requests(exp) -> list[tuple[str, dict[str, float]]]:
    """Resource requests of the sweep's actors and of its concurrent trials.

    Mirrors saesweep.sweep.runner.start_servers: one activation server per
    hookpoint group, and, when training.eval_tokens > 0, a held-out evaluation
    server that requests half a server's CPU (at most 0.5), GPU (at most 0.5) and
    custom resources.
    """
    n_trials = count_trials(exp)
    concurrent = min(n_trials, exp.tune.max_concurrent_trials or n_trials)
    servers = exp.servers.resources
    requests = [
        (f"server-{index}", servers.to_ray()) for index in range(min(exp.servers.count, len(exp.hookpoint_names)))
    ]
    if exp.training.eval_tokens > 0:
        evaluation = {"CPU": min(0.5, servers.cpu), "GPU": min(servers.gpu, 0.5) if servers.gpu else 0.0}
        evaluation.update({name: amount / 2 for name, amount in servers.custom.items()})
        requests.append(("evaluation-server", evaluation))
    requests += [(f"trial-{index}", exp.tune.resources_per_trial.to_ray()) for index in range(concurrent)]
    return requests


def largest_cluster(config: dict) -> list[Node]:
    """The head plus every worker node type at its max_workers."""
    node_types = config["available_node_types"]
    head_type = config["head_node_type"]
    nodes = [Node(head_type, {k: float(v) for k, v in node_types[head_type]["resources"].items()})]
    for name, node_type in node_types.items():
        if name != head_type:
            nodes += [Node(name, {k: float(v) for k, v in node_type["resources"].items()})
                      for _ in range(node_type["max_workers"])]
    return nodes


def placement_order(item: tuple[str, dict[str, float]]) -> tuple[float, float, float]:
    """Sort key that places custom-resource requests first, then the larger GPU and CPU requests."""
    _, request = item
    custom = sum(amount for name, amount in request.items() if name not in ("CPU", "GPU"))
    return (-custom, -request.get("GPU", 0.0), -request.get("CPU", 0.0))


def place(requests: list[tuple[str, dict[str, float]]], nodes: list[Node]) -> list[str]:
    """Place each request, in placement_order, on the first node with room; return the unplaced labels."""
    unplaced = []
    for label, request in sorted(requests, key=placement_order):
        node = next((node for node in nodes if node.fits(request)), None)
        if node is None:
            unplaced.append(label)
        else:
            node.take(label, request)
    return unplaced


def test_gpt2_server_resources_declared(offline, experiment):
    config = prepared(AWS_CONFIG)
    worker_types = {
        name: node_type["resources"]
        for name, node_type in config["available_node_types"].items()
        if name != config["head_node_type"]
    }
    servers = experiment.servers.resources

    assert servers.custom, "experiments/gpt2_all_layers.yaml no longer requests a custom server resource"
    for name, amount in servers.custom.items():
        hosts = {node: resources for node, resources in worker_types.items() if resources.get(name, 0) >= amount}
        assert hosts, f"no worker node type of cluster.yaml declares {name}: {amount}"
        for node, resources in hosts.items():
            assert resources.get("GPU", 0) >= servers.gpu, f"{node} declares {name} without {servers.gpu} GPU"
            assert resources.get("CPU", 0) >= servers.cpu, f"{node} declares {name} without {servers.cpu} CPU"

    trial = experiment.tune.resources_per_trial
    trainers = {
        node: resources
        for node, resources in worker_types.items()
        if not any(name in resources for name in servers.custom)
    }
    assert trainers, "cluster.yaml has no worker node type for trainers"
    for node, resources in trainers.items():
        assert resources.get("GPU", 0) >= trial.gpu, f"{node} has fewer GPUs than one trial requests"
        assert resources.get("CPU", 0) >= trial.cpu, f"{node} has fewer CPUs than one trial requests"


def test_gpt2_sweep_fits_largest_cluster(offline, experiment):
    config = prepared(AWS_CONFIG)
    nodes = largest_cluster(config)
    requests = sweep_requests(experiment)

    assert len(nodes) - 1 <= config["max_workers"]
    unplaced = place(requests, nodes)

    assert unplaced == [], f"no room in the largest cluster for {unplaced}"
    n_servers = sum(1 for label, _ in requests if label.startswith("server-"))
    assert n_servers == min(experiment.servers.count, len(experiment.hookpoint_names))
    n_trials = sum(1 for label, _ in requests if label.startswith("trial-"))
    assert n_trials == experiment.tune.max_concurrent_trials
    head = nodes[0]
    assert head.placed == [], f"the CPU head node would run {head.placed}"
    server_node_types = {node.node_type for node in nodes for label in node.placed if "server" in label}
    assert server_node_types == {"activation_server"}


def test_gpt2_trials_fit_beside_servers(offline, experiment):
    """Every concurrent trial of the GPT-2 sweep finds room on a server node,
    where it reads activations without crossing the network."""
    config = prepared(AWS_CONFIG)
    server_nodes = [node for node in largest_cluster(config) if node.node_type == "activation_server"]
    unplaced = place(sweep_requests(experiment), server_nodes)

    assert unplaced == [], f"no room beside the activation servers for {unplaced}"
