"""Faults outside the happy path, with real processes: a full disk during sharding names its cause; an
index column of the wrong type is refused at plan time; a ragged CSV row is one failed row, not a
failed stage."""
from __future__ import annotations

import json
import subprocess

import pytest

from pipelines.cli import main as cli
from pipelines.config import load_config, replace
from pipelines.shard import run_shard_stage
from shard_inputs import jpeg
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


def test_parquet_path_column_of_the_wrong_type_is_refused_at_plan_time(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": pa.array([1, 2, 3], pa.int64()), "label": [0, 1, 0]}), tmp_path / "i.parquet")
    assert cli(["shard", "--source", str(tmp_path / "i.parquet"), "--set", f"workdir={tmp_path / 'wd'}"]) == 2
    err = capsys.readouterr().err
    assert "shard.path_column: 'path'" in err and "has type int64" in err and "must be strings" in err
    assert not list((tmp_path / "wd" / "shards").glob("*.tmp"))


@pytest.mark.timeout(240)
def test_ragged_csv_rows_are_bad_rows_with_their_line_not_a_stage_failure(ray_local, tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg(i))
    lines = ["path,label", "0.jpg,a", "1.jpg", "2.jpg,b,extra", "3.jpg,a", "1.jpg,"]
    (tmp_path / "index.csv").write_text("\n".join(lines) + "\n")
    cfg = replace(load_config(None), **{"workdir": str(tmp_path / "wd"), "shard.source": str(tmp_path / "index.csv"),
                                        "shard.samples_per_shard": 10})
    manifest = run_shard_stage(cfg)
    assert manifest["totals"]["total"] == 5 and manifest["totals"]["ok"] == 2 and manifest["totals"]["failed"] == 3
    assert manifest["failed_by_reason"] == {"bad_label": 1, "bad_row": 2}
    (stats,) = [json.loads(p.read_text()) for p in (tmp_path / "wd" / "shards").glob("*.stats.json")]
    details = sorted(f["detail"] for f in stats["failures"] if f["reason"] == "bad_row")
    assert details[0].startswith("bad_row: line 3 has 1 cells, the header 2") and "'1.jpg'" in details[0]
    assert details[1].startswith("bad_row: line 4 has 3 cells, the header 2")
