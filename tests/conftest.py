"""Shared fixtures. One local Ray instance for the whole session (Ray starts in ~5 s; tests that need
a multi-node ``ray.cluster_utils.Cluster`` shut it down and the next user starts it again)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture
def ray_local():
    """A running local Ray (4 logical CPUs on 2 real cores, so 2 train workers + helpers schedule)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, log_to_driver=False, include_dashboard=False,
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    yield ray


def pytest_sessionfinish(session, exitstatus):  # noqa: ARG001
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001
        pass
