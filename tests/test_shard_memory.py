"""The shard driver keeps counts, not per-sample failures: on a run where every row fails, its peak memory
is the same for 20k and for 80k rows, while each failure is still in its shard's stats file and in
``failures.parquet``. Measured in a fresh driver process (real local Ray), between whose runs the peak
RSS is reset. The RSS is mostly imports (torch among them), so the driver's Python heap peak is checked
too: when the driver kept every task's stats, it went from 14 MB at 20k rows to 44 MB at 80k."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROWS = (20_000, 80_000)
PER_SHARD = 4_000

DRIVER = r"""
import json, sys, tracemalloc
import ray
from pipelines.config import load_config, replace
from pipelines.shard import run_shard_stage

def peak_mb():  # VmHWM: this process's peak RSS since the last reset
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

def reset_peak():  # "5" resets VmHWM to the current RSS (Linux 4.0 and later)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

root, per_shard = sys.argv[1], int(sys.argv[2])
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
base = replace(load_config(None), **{"workdir": f"{root}/wd", "shard.samples_per_shard": per_shard,
                                     "shard.max_in_flight": 2})
peaks = {}
for i, name in enumerate(sys.argv[3:]):  # the first (small) run starts the workers and imports everything once
    if i == 1:
        tracemalloc.start()
    reset_peak()
    tracemalloc.reset_peak()
    heap0 = tracemalloc.get_traced_memory()[0]
    manifest = run_shard_stage(replace(base, **{"shard.source": f"{root}/{name}.parquet"}), out_dir=f"{root}/{name}")
    peaks[name] = {"rss_mb": peak_mb(), "heap_mb": (tracemalloc.get_traced_memory()[1] - heap0) / 2**20}
    assert manifest["totals"]["ok"] == 0, manifest["totals"]
print(json.dumps(peaks))
"""


def _index(path, rows: int) -> None:
    """Rows whose images do not exist: each fails fast, with reason ``missing``."""
    paths = [f"gone/{i:08d}.jpg" for i in range(rows)]
    pq.write_table(pa.table({"path": paths, "label": [i % 7 for i in range(rows)]}), path)


@pytest.mark.timeout(600)
def test_driver_peak_memory_does_not_grow_with_failed_rows(tmp_path):
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS between runs")
    names = ["warm", *(f"rows{n}" for n in ROWS)]
    _index(tmp_path / "warm.parquet", PER_SHARD)
    for n in ROWS:
        _index(tmp_path / f"rows{n}.parquet", n)
    res = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path), str(PER_SHARD), *names],
                         capture_output=True, text=True, timeout=540)
    assert res.returncode == 0, res.stderr[-4000:]
    peaks = json.loads(res.stdout.strip().splitlines()[-1])
    small, large = peaks[f"rows{ROWS[0]}"], peaks[f"rows{ROWS[1]}"]
    print(f"driver peak: {peaks}")
    assert large["rss_mb"] <= 1.10 * small["rss_mb"], peaks
    assert large["heap_mb"] <= 1.10 * small["heap_mb"], peaks

    # Every failure is kept, in the stats files and merged into failures.parquet, in shard order.
    out = tmp_path / f"rows{ROWS[1]}"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["failed"] == ROWS[1] and manifest["failed_by_reason"] == {"missing": ROWS[1]}
    stats = json.loads((out / "000003.stats.json").read_text())
    assert len(stats["failures"]) == PER_SHARD and stats["failures"][0]["reason"] == "missing"
    failures = pq.read_table(out / "failures.parquet")
    assert failures.num_rows == ROWS[1]
    assert failures.column("key").to_pylist()[:2] == ["000000_000000", "000000_000001"]
    assert failures.slice(3 * PER_SHARD, 1).to_pylist()[0] == stats["failures"][0]


def test_failures_parquet_on_object_storage_equals_the_local_one(ray_local, s3_bucket, tmp_path):
    """The merged failures are published like every other file: the same bytes on S3 as on disk, written
    before the manifest, and rewritten identically by a rerun that redoes a shard."""
    import io

    from pipelines.config import load_config, replace
    from pipelines.shard import run_shard_stage
    from pretrain import storage
    from shard_inputs import jpeg

    (tmp_path / "ok.jpg").write_bytes(jpeg(0, (40, 30)))
    rows = ["ok.jpg" if i % 3 == 0 else f"gone{i}.jpg" for i in range(10)]
    pq.write_table(pa.table({"path": rows, "label": [i % 2 for i in range(10)]}), tmp_path / "index.parquet")
    settings = {"workdir": str(tmp_path / "wd"), "shard.source": str(tmp_path / "index.parquet"),
                "shard.samples_per_shard": 4, "shard.image_size": 32, "shard.shuffle": False}
    cfg = replace(load_config(None), **settings)
    local, remote = tmp_path / "out", f"{s3_bucket}/shards"
    assert run_shard_stage(cfg, out_dir=str(local)) == run_shard_stage(cfg, out_dir=remote)
    data = (local / "failures.parquet").read_bytes()
    assert storage.read_bytes(f"{remote}/failures.parquet") == data
    failures = pq.read_table(io.BytesIO(data)).to_pylist()
    assert [f["source"] for f in failures] == [r for r in rows if r != "ok.jpg"]
    assert {f["reason"] for f in failures} == {"missing"}

    (local / "manifest.json").unlink()
    (local / "000001.stats.json").unlink()
    run_shard_stage(cfg, out_dir=str(local))
    assert (local / "failures.parquet").read_bytes() == data
