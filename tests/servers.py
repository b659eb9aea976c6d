"""Servers the tests start for real, and where they listen. Imported once (by conftest, then by
tests): the S3 endpoint is chosen and exported at import, before Ray or torchrun start processes
that inherit the environment."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional


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


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 (``port``, or a free one), sqlite store in ``folder``,
    artifacts proxied to ``artifacts_destination`` (a folder, or ``s3://...`` as infra/mlflow does).
    ``kill()`` pulls the plug (SIGKILL); ``start()`` brings the same server back (same store, port)."""

    def __init__(self, folder: Path, artifacts_destination: str, port: Optional[int] = None):
        self.folder, self.artifacts = folder, artifacts_destination
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "MlflowServer":
        mlflow = Path(sys.executable).parent / "mlflow"
        log_path = self.folder / "mlflow-server.log"
        with log_path.open("a") as log:
            self.proc = subprocess.Popen(
                [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
                 "--artifacts-destination", self.artifacts],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            assert self.proc.poll() is None, log_path.read_text()[-2000:]
            assert time.monotonic() < deadline, "mlflow server did not answer /health"
            time.sleep(0.5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group we started: the server and its worker
            self.proc.wait()

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
