"""The shard stage end to end on a real local Ray: round trips, bad inputs, URLs, crash safety, CLI + MLflow."""
from __future__ import annotations

import csv
import glob
import json
import os
import signal
import tarfile
import threading
import time
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import load_config, replace
from pipelines.shard import MANIFEST, run_shard_stage, shards_complete
from pretrain.shard_format import PREVIEW
from shard_inputs import BAD_FILES, MAX_PIXELS, UNUSUAL_FILES, ImageServer, jpeg

CLASSES = ["bird", "cat", "dog"]


def make_folder(root, per_class: int = 7, size: Optional[tuple[int, int]] = None) -> dict[str, bytes]:
    """Class subfolders of JPEGs, some larger than the stage's image size (resized), some smaller (kept);
    all of ``size`` when given."""
    files = {}
    for c, name in enumerate(CLASSES):
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            data = jpeg(100 * c + i, size or ((120, 80) if i % 2 else (40, 36)))
            (root / name / f"{i:02d}.jpg").write_bytes(data)
            files[f"{name}/{i:02d}.jpg"] = data
    return files


def config(tmp_path, source: str, **overrides):
    base = {"workdir": str(tmp_path / "wd"), "shard.source": source, "shard.samples_per_shard": 5,
            "shard.image_size": 48, "shard.download.threads": 4,
            "shard.download.allow_private": True,  # the test ImageServer is on 127.0.0.1
            "shard.max_in_flight": 2}  # two workers: each imports torch (via webdataset) once
    return replace(load_config(None), **{**base, **overrides})


def read_samples(out) -> list[dict]:
    import webdataset as wds

    urls = sorted(glob.glob(os.path.join(out, "*.tar")))
    return list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))


def all_stats(out) -> list[dict]:
    return [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, "*.stats.json")))]


def check_totals(out, manifest) -> None:
    stats = all_stats(out)
    assert [s["name"] for s in stats] == [s["name"] for s in manifest["shards"]]
    for s in stats:
        assert s["total"] == s["ok"] + s["failed"] == s["rows"][1] - s["rows"][0]
        assert s["failed"] == len(s["failures"]) == sum(s["failed_by_reason"].values())
    for key in ("total", "ok", "failed", "bytes"):
        assert manifest["totals"][key] == sum(s[key] for s in stats), key
    assert manifest["totals"]["total"] == manifest["totals"]["ok"] + manifest["totals"]["failed"]


def test_folder_round_trip(ray_local, tmp_path):
    files = make_folder(tmp_path / "images")
    cfg = config(tmp_path, str(tmp_path / "images"))
    out = str(tmp_path / "wd" / "shards")
    manifest = run_shard_stage(cfg)
    assert manifest["label_names"] == CLASSES and manifest["num_classes"] == 3
    assert manifest["totals"]["ok"] == 21 and manifest["totals"]["failed"] == 0
    assert [s["name"] for s in manifest["shards"]] == [f"{i:06d}.tar" for i in range(5)]
    assert [s["samples"] for s in manifest["shards"]] == [5, 5, 5, 5, 1]
    check_totals(out, manifest)

    samples = read_samples(out)
    assert [s["__key__"] for s in samples] == [f"{i // 5:06d}_{i % 5:06d}" for i in range(21)]
    for s in samples:
        meta = s["json"]
        assert meta["source"] in files
        assert meta["label"] == meta["source"].split("/")[0] == CLASSES[s["cls"]]
        w, h = s["jpg"].size
        assert min(w, h) == min(48, min(meta["original_size"]))  # downscaled to 48, never upscaled
    with tarfile.open(os.path.join(out, "000000.tar")) as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == ["000000_000000.cls", "000000_000000.jpg", "000000_000000.json"]
    assert {(m.mtime, m.uid, m.gid, m.uname) for m in members} == {(0, 0, 0, "vitscale")}
    # Small RGB JPEGs are stored as their original bytes.
    small = [s for s in samples if s["json"]["original_size"] == [40, 36]]
    assert small
    for s in small:
        with tarfile.open(os.path.join(out, f"{s['__key__'][:6]}.tar")) as tar:
            assert tar.extractfile(f"{s['__key__']}.jpg").read() == files[s["json"]["source"]]

    assert shards_complete(cfg)
    assert not shards_complete(replace(cfg, **{"shard.quality": 90}))
    before = os.path.getmtime(os.path.join(out, "000000.tar"))
    assert run_shard_stage(cfg) == manifest  # complete: returned as it is
    assert os.path.getmtime(os.path.join(out, "000000.tar")) == before


def test_parquet_round_trip_with_integer_labels(ray_local, tmp_path):
    files = make_folder(tmp_path / "images", per_class=4)
    paths = [str(tmp_path / "images" / p) for p in sorted(files)] + [str(tmp_path / "images" / "gone.jpg")]
    labels = [CLASSES.index(p.split("/")[0]) * 2 for p in sorted(files)] + [1]  # ids 0, 2, 4 (1, 3 unused)
    pq.write_table(pa.table({"url": paths, "y": labels}), tmp_path / "index.parquet", row_group_size=4)
    cfg = config(tmp_path, str(tmp_path / "index.parquet"),
                 **{"shard.path_column": "url", "shard.label_column": "y", "shard.samples_per_shard": 6})
    manifest = run_shard_stage(cfg, out_dir=str(tmp_path / "out"))
    assert manifest["label_names"] == ["0", "1", "2", "3", "4"]
    assert manifest["totals"] == {**manifest["totals"], "total": 13, "ok": 12, "failed": 1, "shards": 3}
    assert manifest["failed_by_reason"] == {"missing": 1}
    check_totals(str(tmp_path / "out"), manifest)
    samples = read_samples(str(tmp_path / "out"))
    assert len(samples) == 12
    for s in samples:
        assert s["cls"] == CLASSES.index(os.path.relpath(s["json"]["source"], tmp_path / "images").split("/")[0]) * 2
        assert s["json"]["label"] == str(s["cls"])


def test_bad_inputs_are_recorded_not_fatal(ray_local, tmp_path):
    """Every bad input is a failure with its reason; unusual-but-valid ones are converted."""
    root = tmp_path / "data"
    root.mkdir()
    rows, expected = [], {}
    for name, (make, reason) in sorted(BAD_FILES.items()):
        (root / name).write_bytes(make())
        rows.append({"path": name, "label": 1})
        expected[name] = reason
    for name, make in sorted(UNUSUAL_FILES.items()):
        (root / name).write_bytes(make())
        rows.append({"path": name, "label": 2})
    for i in range(3):
        (root / f"good{i}.jpg").write_bytes(jpeg(i, (70, 50)))
        rows.append({"path": f"good{i}.jpg", "label": 0})
    rows.append({"path": "missing.jpg", "label": 0})
    expected["missing.jpg"] = "missing"
    rows.append({"path": "good0.jpg", "label": "seven"})  # a string among integer labels
    rows.append({"path": "good1.jpg", "label": {"id": 1}})  # (a list would make the index multi-label)
    with open(root / "index.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)

    cfg = config(tmp_path, str(root / "index.jsonl"), **{"shard.max_pixels": MAX_PIXELS, "shard.samples_per_shard": 4})
    out = str(tmp_path / "out")
    manifest = run_shard_stage(cfg, out_dir=out)
    check_totals(out, manifest)
    failures = [f for s in all_stats(out) for f in s["failures"]]
    by_source = {f["source"]: f["reason"] for f in failures if f["source"] in expected}
    assert by_source == expected
    assert sorted(f["reason"] for f in failures if f["source"].startswith("good")) == ["bad_label", "bad_label"]
    assert manifest["totals"]["ok"] == len(UNUSUAL_FILES) + 3
    assert manifest["totals"]["failed"] == len(expected) + 2

    samples = {s["json"]["source"]: s for s in read_samples(out)}
    assert set(UNUSUAL_FILES) <= set(samples)
    for name in UNUSUAL_FILES:
        assert samples[name]["jpg"].mode == "RGB" and samples[name]["cls"] == 2
    upright = np.asarray(samples["rotated.jpg"]["jpg"], np.int32)
    assert upright.shape[0] > upright.shape[1]  # portrait, as the EXIF tag says
    assert upright[:10].mean(axis=(0, 1))[0] > 200  # red band on top


@pytest.mark.timeout(120)
def test_urls_with_timeouts_errors_and_redirects(ray_local, tmp_path):
    files = {f"{n}.jpg": jpeg(i, (64, 48)) for i, n in enumerate("abc")}
    with ImageServer(files, slow_s=5.0) as server:
        urls = [f"{server.url}/img/a.jpg", f"{server.url}/img/b.jpg", f"{server.url}/img/c.jpg",
                f"{server.url}/missing", f"{server.url}/slow/a.jpg", f"{server.url}/reset",
                f"{server.url}/redirect/b.jpg", f"{server.url}/noai/c.jpg"]
        with open(tmp_path / "urls.csv", "w", newline="") as f:
            csv.writer(f).writerows([("path", "label"), *[(u, "web") for u in urls]])
        fast = {"shard.download.timeout_s": 0.5, "shard.download.retries": 1, "shard.download.backoff_s": 0.05}
        cfg = config(tmp_path, str(tmp_path / "urls.csv"), **fast)
        manifest = run_shard_stage(cfg, out_dir=str(tmp_path / "out"))
        assert manifest["totals"]["ok"] == 4  # a, b, c and the redirect
        assert manifest["failed_by_reason"] == {"connection": 1, "http_404": 1, "noai": 1, "timeout": 1}
        check_totals(str(tmp_path / "out"), manifest)
        sources = {f["source"]: f["reason"] for s in all_stats(str(tmp_path / "out")) for f in s["failures"]}
        assert sources == {urls[3]: "http_404", urls[4]: "timeout", urls[5]: "connection", urls[7]: "noai"}

        cfg = replace(cfg, **{"shard.download.respect_noai": False})
        manifest = run_shard_stage(cfg, out_dir=str(tmp_path / "out_noai_off"))
        assert manifest["totals"]["ok"] == 5 and "noai" not in manifest["failed_by_reason"]


def _kill_writer_of(out: str, shard: str, server: ImageServer) -> dict:
    """Wait until the worker writing ``shard`` blocks mid-shard on the held URL, then SIGKILL it."""
    import psutil

    seen = {}
    server.held.wait(60)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "pid" not in seen:
        temps = glob.glob(os.path.join(out, f".{shard}.tar.*.tmp"))
        if temps and os.path.getsize(temps[0]) > 0:
            for proc in psutil.process_iter():
                try:
                    if any(f.path == os.path.abspath(temps[0]) for f in proc.open_files()):
                        seen.update(pid=proc.pid, temp=temps[0], size=os.path.getsize(temps[0]))
                        os.kill(proc.pid, signal.SIGKILL)
                        break
                except (psutil.Error, ProcessLookupError):
                    continue
        time.sleep(0.05)
    server.release()
    return seen


@pytest.mark.timeout(240)
def test_sigkill_mid_shard_then_rerun_equals_clean_run(ray_local, tmp_path):
    files = {f"{i}.jpg": jpeg(i, (200, 150), quality=95) for i in range(12)}
    with ImageServer(files) as server:
        urls = [f"{server.url}/img/{i}.jpg" for i in range(12)]
        urls[6] = f"{server.url}/hold/6.jpg"  # third row of shard 1: rows 4 and 5 are in its tar by then
        with open(tmp_path / "urls.csv", "w", newline="") as f:
            csv.writer(f).writerows([("path", "label"), *[(u, i % 2) for i, u in enumerate(urls)]])
        cfg = config(tmp_path, str(tmp_path / "urls.csv"),  # in index order: the held row stays in shard 1
                     **{"shard.samples_per_shard": 4, "shard.image_size": 256, "shard.task_retries": 0,
                        "shard.shuffle": False})
        out = str(tmp_path / "crashed")
        killer = {}
        thread = threading.Thread(target=lambda: killer.update(_kill_writer_of(out, "000001", server)))
        thread.start()
        with pytest.raises(RuntimeError, match="1 of 3 shards failed"):
            run_shard_stage(cfg, out_dir=out)
        thread.join()
        assert killer.get("size", 0) > 0  # killed in the middle of writing, with part of the tar on disk
        assert sorted(os.listdir(out)) == sorted(
            [".vitscale-shards.json", ".plan", "000000.tar", "000000.stats.json", "000002.tar",
             "000002.stats.json", os.path.basename(killer["temp"])])  # no visible partial tar
        kept = {n: os.stat(os.path.join(out, n)) for n in ("000000.tar", "000002.tar", "000000.stats.json")}

        rerun = run_shard_stage(replace(cfg, **{"shard.task_retries": 3}), out_dir=out)
        for name, st in kept.items():  # finished shards were skipped, not rewritten
            now = os.stat(os.path.join(out, name))
            assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), name
        assert not glob.glob(os.path.join(out, ".*.tmp")) and not os.path.exists(os.path.join(out, ".plan"))

        clean = run_shard_stage(cfg, out_dir=str(tmp_path / "clean"))
        assert rerun == clean
        for i in range(3):
            name = f"{i:06d}.tar"
            assert open(os.path.join(out, name), "rb").read() == open(tmp_path / "clean" / name, "rb").read()

        # With task retries, Ray reruns the killed shard within the same stage run.
        server.arm_hold()
        out = str(tmp_path / "retried")
        thread = threading.Thread(target=lambda: killer.update(_kill_writer_of(out, "000001", server)))
        thread.start()
        retried = run_shard_stage(replace(cfg, **{"shard.task_retries": 1}), out_dir=out)
        thread.join()
        assert retried == clean
        assert json.load(open(os.path.join(out, "000001.stats.json")))["pid"] != killer["pid"]
        assert not glob.glob(os.path.join(out, ".*.tmp"))  # the retry cleared the killed attempt's temporary


def test_cli_logs_stage_metrics_to_mlflow(ray_local, tmp_path, capfd):
    from pipelines.cli import main
    from pipelines.tracking import client_for

    make_folder(tmp_path / "images", per_class=3)
    wd, out = tmp_path / "wd", tmp_path / "cli_out"
    argv = ["shard", "--source", str(tmp_path / "images"), "--out", str(out),
            "--set", f"workdir={wd}", "--set", "shard.image_size=32", "--preview"]
    assert main(argv) == 0
    assert (out / PREVIEW).stat().st_size > 0  # the contact sheet, drawn after a real run
    assert "shard: 1/1 shards, 9 images ok, 0 failed" in capfd.readouterr().err  # log lines, not a bar: no TTY
    manifest = json.load(open(out / MANIFEST))
    assert manifest["totals"]["ok"] == 9 and manifest["source"] == str(tmp_path / "images")
    client = client_for(load_config(None, [f"workdir={wd}"]))
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    (run,) = [r for r in runs if r.data.tags.get("vitscale.stage") == "shard"]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["shard.images_ok"] == 9 and run.data.metrics["shard.images_failed"] == 0
    assert run.data.metrics["shard.images_per_s"] > 0 and run.data.metrics["shard.num_classes"] == 3
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == [MANIFEST]

    assert main(["shard", "--source", str(tmp_path / "nope.csv"), "--set", f"workdir={wd}"]) == 2
