"""Leases on output roots, with real processes: a second run on a root is refused (exit 2, naming the
holder), on a local folder and on the S3 server; a SIGKILLed holder's rerun takes the lease over; so
does a run that finds a stale heartbeat from another host."""
from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.cli import main as cli
from pretrain import storage
from pretrain.lease import LEASE, Lease, LeaseHeld
from shard_inputs import ImageServer, jpeg

REPO = Path(__file__).resolve().parents[1]
HOLD = """
import sys, time
from pretrain.lease import Lease
with Lease(sys.argv[1], "vitscale pretrain"):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(root: str) -> subprocess.Popen:
    """Another process holding the lease on ``root`` (returns once it holds it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, root], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.stdout.readline().strip() == "held"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return f"{request.getfixturevalue('s3_bucket')}/root"


def test_second_holder_is_refused_and_a_killed_holders_lease_is_taken_over(root, caplog):
    holder = _holder(root)
    try:
        with pytest.raises(LeaseHeld, match=rf"in use by vitscale pretrain on host {socket.gethostname()} "
                                            rf"pid {holder.pid}"):
            Lease(root, "second").acquire()
    finally:
        _kill(holder)
    with caplog.at_level("WARNING", logger="pretrain.lease"), Lease(root, "rerun") as lease:
        assert f"its process {holder.pid} is gone" in caplog.text
        record = storage.read_json(storage.join(root, LEASE))
        assert record["token"] == lease.token and record["pid"] == os.getpid()
        with Lease(root, "nested"):  # one process, nested blocks: the outer lease covers both
            pass
        assert storage.exists(storage.join(root, LEASE))
    assert not storage.exists(storage.join(root, LEASE))  # released


def test_killed_holder_takeover_is_announced(tmp_path, caplog):
    root = str(tmp_path / "root")
    holder = _holder(root)
    _kill(holder)
    with caplog.at_level("WARNING", logger="pretrain.lease"), Lease(root, "rerun"):
        out = caplog.text  # a warning, through logging
    assert f"taking over the lease of vitscale pretrain on host {socket.gethostname()} pid {holder.pid}" in out
    assert f"its process {holder.pid} is gone" in out


def test_stale_heartbeat_from_another_host_is_taken_over(tmp_path, caplog):
    root = tmp_path / "root"
    root.mkdir()
    old = time.time() - 3600
    (root / LEASE).write_text(json.dumps({"what": "vitscale shard", "host": "node-that-died", "pid": 1,
                                          "start": old, "heartbeat": old, "token": "x"}))
    with caplog.at_level("WARNING", logger="pretrain.lease"), Lease(str(root), "rerun"):
        assert "no heartbeat for" in caplog.text
    (root / LEASE).write_text(json.dumps({"what": "vitscale shard", "host": "busy-node", "pid": 1,
                                          "start": old, "heartbeat": time.time(), "token": "y"}))
    with pytest.raises(LeaseHeld, match="in use by vitscale shard on host busy-node pid 1"):
        Lease(str(root), "second").acquire()


def test_heartbeat_keeps_a_long_run_alive(tmp_path):
    root = str(tmp_path / "root")
    with Lease(root, "long", heartbeat_s=0.05) as lease:
        first = storage.read_json(storage.join(root, LEASE))["heartbeat"]
        time.sleep(0.5)
        assert storage.read_json(storage.join(root, LEASE))["heartbeat"] > first
        assert storage.read_json(storage.join(root, LEASE))["token"] == lease.token


@pytest.mark.timeout(300)
def test_second_vitscale_shard_and_pretrain_exit_2_naming_the_holder(ray_local, tmp_path, capsys):
    files = {f"{i}.jpg": jpeg(i) for i in range(4)}
    with ImageServer(files, hold_s=120) as server:
        with open(tmp_path / "urls.csv", "w", newline="") as f:
            rows = [(f"{server.url}/hold/0.jpg", 0)] + [(f"{server.url}/img/{i}.jpg", i % 2) for i in range(1, 4)]
            csv.writer(f).writerows([("path", "label"), *rows])
        args = ["shard", "--source", str(tmp_path / "urls.csv"), "--set", f"workdir={tmp_path / 'wd'}",
                "--set", "shard.samples_per_shard=2", "--set", "shard.download.allow_private=true"]
        first = subprocess.Popen([str(Path(sys.executable).with_name("vitscale")), *args], cwd=tmp_path,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            assert server.held.wait(120), first.stderr.read() if first.poll() is not None else "no request held"
            assert cli(args) == 2
            err = capsys.readouterr().err
            assert f"in use by vitscale shard on host {socket.gethostname()} pid {first.pid}" in err
        finally:
            os.killpg(first.pid, signal.SIGKILL)  # the driver and its Ray processes
            first.wait()
            server.release()
        assert cli(args) == 0  # the rerun takes the dead run's lease over and finishes
        out = capsys.readouterr()
        assert f"taking over the lease of vitscale shard on host {socket.gethostname()} pid {first.pid}" in out.err

    holder = _holder(str(tmp_path / "wd" / "checkpoints"))
    try:
        assert cli(["pretrain", "local", "--set", f"workdir={tmp_path / 'wd'}"]) == 2
        assert f"pid {holder.pid}" in capsys.readouterr().err
    finally:
        _kill(holder)


@pytest.mark.timeout(300)
def test_two_pretraining_jobs_on_one_checkpoint_root(tmp_path, capsys):
    """A real job (torchrun, 2 ranks: rank 0 holds the lease) is training; `vitscale pretrain` on the same
    workdir exits 2 naming it. Once the job is SIGKILLed, the next job takes the lease over and trains."""
    import psutil

    from test_train_job import start_torchrun, train_config, write_shards

    shards = write_shards(tmp_path / "shards")
    long_job = train_config(tmp_path / "wd", shards, steps=2000, log_every=100)
    lease = tmp_path / "wd" / "checkpoints" / LEASE
    first = start_torchrun(long_job, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 120
        while not lease.exists():
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.2)
        holder = json.loads(lease.read_text())
        assert holder["what"] == "pretrain.launch"
        assert cli(["pretrain", "local", "--set", f"workdir={tmp_path / 'wd'}", "--set", f"pretrain.shards={shards}"]) == 2
        assert f"in use by pretrain.launch on host {socket.gethostname()} pid {holder['pid']}" in capsys.readouterr().err
    finally:
        for proc in [psutil.Process(first.pid), *psutil.Process(first.pid).children(recursive=True)]:
            proc.kill()  # the launcher and its ranks, as a node failure would
        first.wait()
    second = start_torchrun(train_config(tmp_path / "wd", shards, steps=2), tmp_path / "second.log")
    assert second.wait(timeout=240) == 0, (tmp_path / "second.log").read_text()[-3000:]
    log = (tmp_path / "second.log").read_text()
    assert f"taking over the lease of pretrain.launch on host {socket.gethostname()} pid {holder['pid']}" in log
    assert not lease.exists()  # released at the end
