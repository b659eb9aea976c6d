"""Faults outside the happy path, with real processes: a full disk during sharding names its cause."""
from __future__ import annotations

import subprocess

import pytest

from pipelines.config import load_config, replace
from pipelines.shard import run_shard_stage
from test_shard import make_folder


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: a real filesystem that fills up (needs root, as CI and this machine have)."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.timeout(240)
def test_disk_full_during_sharding_names_no_space_left(ray_local, tmp_path, small_disk):
    make_folder(tmp_path / "images", per_class=12, size=(640, 480))
    cfg = replace(load_config(None), **{"workdir": str(tmp_path / "wd"), "shard.source": str(tmp_path / "images"),
                                        "shard.samples_per_shard": 6, "shard.image_size": 400,
                                        "shard.task_retries": 0, "shard.max_in_flight": 2})
    out = str(small_disk / "shards")
    with pytest.raises(RuntimeError) as failed:
        run_shard_stage(cfg, out_dir=out)
    message = str(failed.value)
    assert "OSError: [Errno 28] No space left on device" in message
    assert f"a disk is full (No space left on device): free space where the shards are written ({out})" in message
    assert "RayTaskError" not in message
