"""Shared fixtures. One local Ray instance for the whole session (Ray starts in ~5 s; tests that need
a multi-node ``ray.cluster_utils.Cluster`` shut it down and the next user starts it again), and one
S3 server (moto's, a real HTTP S3 API on 127.0.0.1) reached only through the standard variables."""
from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from servers import S3_ENDPOINT, S3_PORT

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server on ``S3_ENDPOINT``, one for the whole test run; yields the endpoint."""
    from pipelines.bench.moto import start_moto

    with open(tmp_path_factory.mktemp("s3") / "moto.log", "wb") as log:
        proc = start_moto(S3_PORT, log)
    yield S3_ENDPOINT
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def s3_bucket(s3_server):
    """A new empty bucket on the test S3 server; yields ``s3://NAME``."""
    import s3fs

    name = f"vitscale-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
    yield f"s3://{name}"


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
