"""moto's S3 server (``moto[server]``, the test extra) on a 127.0.0.1 port: the loopback object store of
``bench loader --s3`` and of the tests, reached like S3 or MinIO through ``AWS_ENDPOINT_URL``."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Union

from pretrain.errors import InputError


def start_moto(port: int, log: Union[int, IO] = subprocess.DEVNULL, timeout_s: float = 60) -> subprocess.Popen:
    """Start ``moto_server`` from this environment on ``port``; returns once it accepts connections."""
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        raise InputError(f"no moto_server beside {sys.executable}: install moto[server] (the test extra)")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start on port {port}") from None
            time.sleep(0.2)
