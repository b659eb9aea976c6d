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
