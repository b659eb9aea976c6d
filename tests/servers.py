"""Servers the tests start for real, and where they listen. Imported once (by conftest, then by
tests): the S3 endpoint is chosen and exported at import, before Ray or torchrun start processes
that inherit the environment."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Set before anything starts (Ray's workers and torchrun's ranks inherit the environment at their
# start), the way a user points s3fs, boto3 and MLflow at MinIO or Ceph. The server itself starts
# on first use (``s3_server``).
S3_PORT = free_port()
S3_ENDPOINT = f"http://127.0.0.1:{S3_PORT}"
os.environ.update({"AWS_ENDPOINT_URL": S3_ENDPOINT, "AWS_ACCESS_KEY_ID": "vitscale-test",
                   "AWS_SECRET_ACCESS_KEY": "vitscale-test", "AWS_DEFAULT_REGION": "us-east-1"})
for _var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_var, None)


@contextlib.contextmanager
def mlflow_server(folder: Path, artifacts_destination: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """A real ``mlflow server`` on a free 127.0.0.1 port, sqlite store in ``folder``, artifacts proxied
    to ``artifacts_destination`` (a folder, or ``s3://...`` as infra/mlflow does); yields (uri, process)."""
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    log_path = folder / "mlflow-server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
             "--artifacts-destination", artifacts_destination],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, log_path.read_text()[-2000:]
            assert time.monotonic() < deadline, "mlflow server did not answer /health"
            time.sleep(0.5)
        yield uri, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the group we started: the server and its worker
            proc.wait()
