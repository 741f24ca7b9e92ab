"""Connecting to Ray: an existing cluster, or a local instance bound to loopback."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

# Ray 2.60 binds its gRPC servers to every interface unless the node address is
# loopback, and it rewrites an explicit 127.0.0.1 to the routable address. With
# this variable set to 0 Ray takes the loopback address as the node address, so
# a local instance listens on 127.0.0.1 only.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def bind_local_ray_to_loopback() -> None:
    """Make a Ray instance started by this process listen on 127.0.0.1 only.

    Call before `ray.init` starts a local instance. The environment variable
    reaches processes started later; the module constant covers a `ray` that is
    already imported.
    """
    os.environ[LOOPBACK_ENV] = "0"
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def connect(address: str | None = None, num_cpus: int | None = None, **init_kwargs) -> str:
    """Connect to the Ray cluster at `address` (or `RAY_ADDRESS`), or start a local one.

    A local instance listens on 127.0.0.1 only and has no dashboard. Returns the
    address of the cluster the process is connected to.
    """
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, **init_kwargs)
    else:
        bind_local_ray_to_loopback()
        logger.info("starting a local Ray instance on 127.0.0.1 (num_cpus=%s)", num_cpus)
        init_kwargs.setdefault("include_dashboard", False)
        # "local" starts a new instance even when another Ray cluster runs on this machine,
        # which a plain ray.init() would join.
        ray.init(address="local", num_cpus=num_cpus, **init_kwargs)
    return ray.get_runtime_context().gcs_address
