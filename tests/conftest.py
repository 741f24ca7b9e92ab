"""Shared fixtures: one local Ray instance for the whole test session, bound to loopback."""

from __future__ import annotations

import os

# Set before anything imports ray, so that every Ray process this session
# starts listens on 127.0.0.1 only.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance with 4 logical CPUs, shared by every test that requests it."""
    import ray

    from saesweep import raycluster

    if ray.is_initialized():
        ray.shutdown()
    raycluster.bind_local_ray_to_loopback()
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        object_store_memory=512 * 1024**2,
    )
    yield ray
    ray.shutdown()
