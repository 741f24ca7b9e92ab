"""Trial placement beside the activation server of its hookpoint, and the number of servers."""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass
from typing import Any

import ray
from ray import tune
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from saesweep.activations.models import ModelInfo
from saesweep.experiment import ExperimentConfig, Resources

logger = logging.getLogger(__name__)

# NOTE: Ray 2.60 marks this placement-group argument private and experimental. It is
# a soft hint that Ray honours for STRICT_PACK groups only: the group goes to the
# target node when that node has the resources free, and to another node otherwise.
_SOFT_TARGET_ARGUMENT = "_soft_target_node_id"
_HAS_SOFT_TARGET = _SOFT_TARGET_ARGUMENT in inspect.signature(placement_group).parameters


@dataclass(frozen=True)
class TrialPlacement:
    """Resource request of every trial, and the node each trial prefers by hookpoint.

    Tune calls it with a trial's config and gets that trial's placement group factory.
    """

    bundle: dict[str, float]
    server_nodes: dict[str, str]
    """hookpoint -> Ray node id of the activation server that streams it."""

    def __call__(self, config: dict[str, Any]) -> tune.PlacementGroupFactory:
        node_id = self.server_nodes.get(config.get("hookpoint", ""))
        if node_id is None or not _HAS_SOFT_TARGET:
            return tune.PlacementGroupFactory([self.bundle])
        return tune.PlacementGroupFactory([self.bundle], strategy="STRICT_PACK", **{_SOFT_TARGET_ARGUMENT: node_id})


def trial_resources(exp: ExperimentConfig, server_nodes: dict[str, str]) -> TrialPlacement | dict[str, float]:
    """Return what `tune.with_resources` takes for the trials of `exp`.

    With `tune.prefer_server_node`, each trial prefers the node in `server_nodes`
    (hookpoint -> node id) of its hookpoint's server; otherwise Ray places it.
    """
    request = {name: value for name, value in exp.tune.resources_per_trial.to_ray().items() if value}
    if not exp.tune.prefer_server_node:
        return request
    if not _HAS_SOFT_TARGET:
        logger.warning("this Ray version has no soft node target for placement groups: Ray places the trials")
    return TrialPlacement(bundle=request, server_nodes=dict(server_nodes))


@dataclass(frozen=True)
class ServerSlot:
    """Resources reserved for one activation server on one node, before the server starts."""

    placement_group: PlacementGroup
    node_id: str

    @property
    def scheduling_strategy(self) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=0)


def reserve_server_slot(resources: Resources) -> ServerSlot | None:
    """Reserve `resources` for an activation server and return the slot with its node id.

    Knowing the node before the server has loaded its model lets the trials start,
    and import their modules, while the server loads. Blocks until Ray places the
    reservation. Returns None for a request without any resource.
    """
    bundle = {name: value for name, value in resources.to_ray().items() if value}
    if not bundle:
        return None
    group = placement_group([bundle], strategy="STRICT_PACK")
    ray.get(group.ready())
    return ServerSlot(group, placement_group_table(group)["bundles_to_node_id"][0])


DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
GIB = 1024**3


def hookpoint_batch_bytes(exp: ExperimentConfig, info: ModelInfo, hookpoint: str) -> int:
    """Return the bytes of the batches in flight for one hookpoint: an upper bound,
    since a batch serves fewer positions than it runs forward."""
    servers = exp.servers
    tokens = servers.max_batches_in_flight * servers.sequences_per_batch * exp.data.context_size
    return tokens * info.hook_d_in(hookpoint) * DTYPE_BYTES.get(exp.model.dtype, 4)


def server_count(exp: ExperimentConfig, info: ModelInfo) -> int:
    """Return the number of activation servers for `exp`: servers.count, raised
    until each server's share of hookpoints fits servers.max_batch_memory_gb."""
    hookpoints = exp.hookpoint_names
    budget_gb = exp.servers.max_batch_memory_gb
    count = min(exp.servers.count, len(hookpoints))
    if budget_gb is None:
        return count
    per_hookpoint = max(hookpoint_batch_bytes(exp, info, hookpoint) for hookpoint in hookpoints)
    if per_hookpoint > budget_gb * GIB:
        raise ValueError(
            f"servers.max_batch_memory_gb = {budget_gb:g} GiB cannot hold the batches of one hookpoint "
            f"({per_hookpoint / GIB:.2f} GiB: max_batches_in_flight x sequences_per_batch x "
            "context_size x d_in): raise it, or lower servers.max_batches_in_flight or "
            "servers.sequences_per_batch"
        )
    needed = math.ceil(len(hookpoints) / math.floor(budget_gb * GIB / per_hookpoint))
    if needed > count:
        logger.info(
            "starting %d activation servers instead of %d: %d hookpoints of %.2f GiB in flight each "
            "exceed servers.max_batch_memory_gb = %g on one server",
            needed, count, len(hookpoints), per_hookpoint / GIB, budget_gb,
        )
    return max(count, needed)
