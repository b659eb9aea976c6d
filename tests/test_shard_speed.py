"""The shard stage's fast start and hot loop, and the head-to-head benchmark's own pieces, for real:
``vitscale shard`` as a fresh process (its own local Ray, MLflow set up beside it) on URLs served by
``python -m http.server`` on 127.0.0.1. Speed itself is shown by ``vitscale bench shard --vs
img2dataset``, never asserted here."""
from __future__ import annotations

import contextlib
import csv
import glob
import json
import os

import pytest

from pipelines.bench.shard import make_corpus
from pipelines.bench.shard_vs import Server, psnr_vs_pillow, run_vitscale, url_list
from pipelines.config import load_config
from pipelines.shard import _entered_aside


@pytest.mark.timeout(600)
def test_a_fresh_shard_command_on_urls_reruns_byte_identical_with_the_old_pictures_quality(tmp_path):
    """Two fresh ``vitscale shard`` processes (no Ray running: each starts its own, without dashboard,
    its MLflow run set up in a thread) on the benchmark's photos behind loopback URLs, one of them a
    404: the same tars byte for byte, every failure with its reason, runs FINISHED with their metrics,
    and the pictures within 40 dB PSNR of the Pillow path the stage used to take."""
    from pipelines.tracking import client_for

    root = str(tmp_path / "photos")
    paths = make_corpus(root, 60, seed=3)
    server = Server(root)
    try:
        index = url_list(str(tmp_path / "urls.csv"), server.url, paths, root, 75)  # 15 URLs repeat photos
        with open(index, "a", newline="") as f:
            csv.writer(f).writerow([f"{server.url}/nope.jpg", "class0"])
        runs = [run_vitscale(index, str(tmp_path / f"out{i}"), str(tmp_path / f"wd{i}")) for i in range(2)]
    finally:
        server.close()
    assert [(r["ok"], r["total"]) for r in runs] == [(75, 76)] * 2
    tars = [sorted(glob.glob(str(tmp_path / f"out{i}" / "*.tar"))) for i in range(2)]
    assert len(tars[0]) == 1 and [os.path.basename(t) for t in tars[0]] == [os.path.basename(t) for t in tars[1]]
    assert all(open(a, "rb").read() == open(b, "rb").read() for a, b in zip(*tars))
    stats = json.load(open(tmp_path / "out0" / "000000.stats.json"))
    assert [(f["source"], f["reason"]) for f in stats["failures"]] == [(f"{server.url}/nope.jpg", "http_404")]

    client = client_for(load_config(None, [f"workdir={tmp_path / 'wd0'}"]))
    (run,) = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert run.info.status == "FINISHED" and run.data.metrics["shard.images_ok"] == 75

    psnr, compared = psnr_vs_pillow(str(tmp_path / "out0"), root)
    assert compared > 20 and psnr >= 40, (compared, psnr)  # the rest were kept as they were


def test_a_context_entered_aside_is_exited_with_the_blocks_outcome():
    """``_entered_aside`` (how the shard command sets MLflow up beside Ray's start): the value once
    entered; the block's exception reaches the manager (a run ends FAILED), and an entry that fails
    surfaces where the value is asked for."""
    seen = []

    @contextlib.contextmanager
    def manager(value):
        if value is None:
            raise OSError("cannot enter")
        try:
            yield value
            seen.append("ok")
        except ValueError as e:
            seen.append(f"failed: {e}")
            raise

    with _entered_aside(manager("run-1")) as value:
        assert value() == "run-1"
    with pytest.raises(ValueError, match="stage broke"), _entered_aside(manager("run-2")):
        raise ValueError("stage broke")
    assert seen == ["ok", "failed: stage broke"]
    with pytest.raises(OSError, match="cannot enter"), _entered_aside(manager(None)) as value:
        value()


def test_warm_workers_import_in_every_cpus_worker(ray_local):
    import ray

    from pipelines.cluster import warm_workers
    from pipelines.shard import TASK_MODULES

    refs = warm_workers(TASK_MODULES)
    assert len(refs) == int(ray.cluster_resources()["CPU"])
    assert ray.get(refs, timeout=120) == [None] * len(refs)


def test_stop_ray_leaves_a_ray_it_did_not_start_running(ray_local):
    """The command stops only the local Ray it started: the one this test session shares stays up."""
    from pipelines.cluster import ensure_ray, stop_ray
    from pipelines.config import RayConfig

    ensure_ray(RayConfig())  # already up: joins nothing, starts nothing
    stop_ray()
    assert ray_local.is_initialized() and ray_local.cluster_resources().get("CPU")


STOP_RAY = """
import json
import ray
from ray._private import worker
from pipelines.cluster import ensure_ray, stop_ray
from pipelines.config import RayConfig
ensure_ray(RayConfig(), dashboard=False)
processes = {kind: [i.process for i in infos] for kind, infos in worker._global_node.all_processes.items()}
stop_ray()
assert not ray.is_initialized()
codes = {kind: [p.wait(10) for p in ps] for kind, ps in processes.items()}  # raises if one is left running
print(json.dumps(sorted(codes)))
"""


@pytest.mark.timeout(120)
def test_stop_ray_stops_the_local_instance_it_started(tmp_path):
    """In a fresh process (no Ray up), ``stop_ray`` shuts down what ``ensure_ray`` started, its
    autoscaler monitor killed first (see ``stop_ray``), and no head process is left running."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", STOP_RAY], capture_output=True, text=True, timeout=100,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         env={**os.environ, "RAY_ADDRESS": ""})
    assert res.returncode == 0, res.stderr[-3000:]
    assert {"raylet", "gcs_server", "monitor"} <= set(json.loads(res.stdout.strip().splitlines()[-1]))


def test_the_shard_tar_is_byte_for_byte_what_webdatasets_writer_writes():
    """The tasks write tars without importing webdataset (and with it torch): the same bytes."""
    import io

    import webdataset as wds

    from pipelines.shard_task import TAR_MTIME, TAR_USER, _SampleTar

    samples = [("000003_000000", {"jpg": b"\xff\xd8 jpeg", "cls": b"2", "json": b'{"label": "cat"}'}),
               ("000003_000001", {"jpg": b"x" * 1000, "json": b'{"labels": [0, 4]}'}),
               ("000003_000002", {"jpg": b"y" * 512, "cls": b"0"}),  # a whole block: no padding
               ("000003_000003", {"jpg": bytes(range(256)) * 90, "cls": b"11"})]  # past a 10 KB record
    ours, theirs = io.BytesIO(), io.BytesIO()
    writer = _SampleTar(ours)
    reference = wds.TarWriter(theirs, encoder=False, mtime=TAR_MTIME, user=TAR_USER, group=TAR_USER)
    for key, fields in samples:
        writer.write(key, fields)
        reference.write({"__key__": key, **fields})
    writer.close()
    reference.close()
    assert ours.getvalue() == theirs.getvalue()


def test_cached_tar_headers_are_tarfiles_own():
    """Headers filled into a cached one are the ones tarfile makes, and names it must extend (too long,
    not ASCII) or sizes past 11 octal digits still come from tarfile itself."""
    from pipelines.shard_task import _member_header, _tarfile_header

    names = ["a", "000001_000001.jpg", "000001_000001.json", "x" * 99, "x" * 100, "x" * 300, "é.jpg"]
    for name in names:
        for size in (0, 1, 511, 512, 513, 31234, 64 << 20, 8 ** 11 - 1, 8 ** 11):
            assert _member_header(name, size) == _tarfile_header(name, size), (name, size)

