"""Object-storage workdirs end to end, against a real S3 API (moto's server on 127.0.0.1, reached only
through AWS_ENDPOINT_URL and s3fs): `vitscale run` writes every stage's output to the bucket and skips
it all on a rerun; MLflow's artifacts go to S3 through a real `mlflow server`; the presets refuse
their placeholder bucket; a remote workdir without an MLflow server says what to set."""
from __future__ import annotations

import json
import os

import mlflow
import pytest
import s3fs

from pipelines.cli import main as cli
from pipelines.config import load_config
from pipelines.run import run_pipeline
from pretrain import storage
from servers import MlflowServer
from test_run import SMALL


def _objects(url: str) -> set[str]:
    """Every object under ``url``, as paths relative to it."""
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    root = url.removeprefix("s3://").rstrip("/")
    return {p[len(root) + 1:] for p in fs.find(root)}


@pytest.mark.timeout(600)
def test_run_on_an_s3_workdir_then_rerun_skips(ray_local, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a stray local folder named "s3:" would appear here
    with MlflowServer(tmp_path, f"{s3_bucket}/mlflow") as server:
        uri = server.uri
        cfg = load_config(None, [f"workdir={s3_bucket}/run", f"tracking.uri={uri}", "tracking.experiment=s3", *SMALL])
        first = run_pipeline(cfg)
        objects = _objects(f"{s3_bucket}/run")
        manifest = storage.read_json(f"{s3_bucket}/run/shards/manifest.json")
        assert manifest["totals"]["ok"] == 80 and len(manifest["shards"]) == 2
        for shard in manifest["shards"]:
            assert {f"shards/{shard['name']}", f"shards/{shard['name'][:-4]}.stats.json"} <= objects
        steps = sorted(o.split("/")[1] for o in objects if o.startswith("checkpoints/step_") and o.endswith("/COMPLETE"))
        assert steps == ["step_00000003", "step_00000006"]
        assert {"export/model.safetensors", "export/config.json", "export/pretrain.json",
                "transfer/report.md", "transfer/plot.png", "transfer/results.json",
                "source/fractal/index.csv", "config.resolved.yaml"} <= objects
        assert not any(o.startswith("shards/.plan") for o in objects)  # removed once the manifest is out
        assert "| digits |" in storage.read_text(f"{s3_bucket}/run/transfer/report.md")
        assert "| digits |" in first["summary"]
        assert not [p for p in tmp_path.rglob("*") if p.name.startswith("s3:")]
        assert not os.path.exists(os.path.join(os.path.dirname(__file__), "..", "s3:"))

        # The server proxies artifacts to the bucket: nothing of the runs' files lives on its disk.
        client = mlflow.MlflowClient(uri)
        artifacts = _objects(f"{s3_bucket}/mlflow")
        assert any(a.endswith("/artifacts/config.yaml") for a in artifacts), artifacts
        assert any(a.endswith("/artifacts/transfer/report.md") for a in artifacts), artifacts
        assert any(a.endswith("/artifacts/config.resolved.yaml") for a in artifacts), artifacts
        runs = client.search_runs([client.get_experiment_by_name("s3").experiment_id])
        stages = [r.data.tags["vitscale.stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == first["run_id"]]
        assert sorted(stages) == ["pretrain", "shard", "transfer"]
        assert all(r.info.status == "FINISHED" for r in runs)

        before = {o: storage.identity(f"{s3_bucket}/run/{o}") for o in objects if not o.startswith("ray_results/")}
        second = run_pipeline(cfg)
        assert [second[s] for s in ("shard", "pretrain", "transfer")] == ["skipped"] * 3
        after = {o: storage.identity(f"{s3_bucket}/run/{o}") for o in before}
        assert after == before  # nothing rewritten
        assert json.loads(storage.read_text(f"{s3_bucket}/run/export/pretrain.json")) == {"step": 6}


@pytest.mark.parametrize("preset", ["vit_b16_i21k", "vit_l16_jft", "vit_h14_jft"])
def test_presets_refuse_their_placeholder_bucket(preset, capsys):
    for command in (["shard", preset], ["run", preset], ["pretrain", preset]):
        assert cli(command) == 2
        err = capsys.readouterr().err
        assert "workdir:" in err and "CHANGE-ME" in err and "--set workdir=s3://" in err


def test_remote_workdir_without_an_mlflow_server_says_what_to_set(s3_bucket, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli(["shard", "vit_l16_jft", "--set", f"workdir={s3_bucket}/x"]) == 2
    err = capsys.readouterr().err
    assert "tracking.uri" in err and "--set tracking.uri=http" in err and "MLFLOW_TRACKING_URI" in err
    assert not _objects(s3_bucket)  # refused before writing anything


CHILD = """
import pickle, sys
from pipelines.shard_task import write_shard
ctx, job = pickle.load(open(sys.argv[1], "rb"))
write_shard(ctx, job)
"""


@pytest.mark.timeout(300)
def test_shard_task_killed_mid_upload_then_rerun_equals_a_clean_run(ray_local, s3_bucket, tmp_path):
    """A shard task's process is SIGKILLed while its tar is being uploaded (the PUT held half-sent by a
    proxy): no object appears, nothing reads the shard, and the rerun's objects equal a clean run's."""
    import pickle
    import subprocess
    import sys

    from pipelines.config import replace
    from pipelines.images import ImageSettings
    from pipelines.shard import plan_stage, run_shard_stage, stage_hash
    from pipelines.shard_task import TaskContext, write_shard
    from pretrain.data import resolve_shards
    from s3_proxy import FaultyProxy
    from servers import S3_ENDPOINT
    from test_shard import make_folder

    make_folder(tmp_path / "images", per_class=4, size=(300, 200))
    cfg = replace(load_config(None), **{"workdir": str(tmp_path / "wd"), "shard.source": str(tmp_path / "images"),
                                        "shard.samples_per_shard": 4, "shard.image_size": 128})
    clean = run_shard_stage(cfg, out_dir=f"{s3_bucket}/clean")

    out = f"{s3_bucket}/crashed"
    plan, jobs = plan_stage(cfg, out, stage_hash(cfg))
    ctx = TaskContext(plan.table, plan.label_names, ImageSettings.from_config(cfg.shard), cfg.shard.download, out)
    write_shard(ctx, jobs[0])  # one shard done before the crash
    (tmp_path / "job.pkl").write_bytes(pickle.dumps((ctx, jobs[1])))
    with FaultyProxy(S3_ENDPOINT, hold_upload="/crashed/000001.tar") as proxy:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "job.pkl")],
                                 env={**os.environ, "AWS_ENDPOINT_URL": proxy.endpoint})
        try:
            assert proxy.upload_held.wait(120), "the tar's upload never started"
        finally:
            child.kill()
            child.wait()
    objects = _objects(out)
    assert {"000000.tar", "000000.stats.json"} <= objects
    assert not {"000001.tar", "000001.stats.json", "manifest.json"} & objects  # no half object, no marker
    with pytest.raises(Exception, match="incomplete|manifest"):
        resolve_shards(out)  # a folder without its manifest is not a dataset yet

    rerun = run_shard_stage(cfg, out_dir=out)
    assert rerun == clean
    for shard in clean["shards"]:
        assert storage.read_bytes(f"{out}/{shard['name']}") == storage.read_bytes(f"{s3_bucket}/clean/{shard['name']}")
