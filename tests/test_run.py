"""The embedded default end to end (`vitscale run` on the `local` preset), at a test-sized setting:
real Ray, real DeepSpeed under Ray Train, real MLflow in a sqlite file."""
from __future__ import annotations

import json
from pathlib import Path

import mlflow

from pipelines.config import load_config
from pipelines.run import run_pipeline
from pipelines.tracking import tracking_uri

SMALL = [
    "shard.builtin.classes=4", "shard.builtin.images_per_class=20", "shard.builtin.image_size=48",
    "shard.samples_per_shard=40", "shard.image_size=32",
    "pretrain.steps=6", "pretrain.warmup_steps=2", "pretrain.log_every=3", "pretrain.checkpoint_every=3",
    "pretrain.global_batch=16", "pretrain.micro_batch=8", "pretrain.loader_workers=0",
    "model.variant=mu/8", "transfer.img_size=32",
    "transfer.steps=6", "transfer.lrs=[0.03]", "transfer.batch=32", "transfer.shots=[1,5]",
    "transfer.compare_scratch=false",
]


def test_local_preset_end_to_end_then_rerun_skips(ray_local, tmp_path):
    cfg = load_config(None, [f"workdir={tmp_path / 'work'}", "tracking.experiment=e2e", *SMALL])
    first = run_pipeline(cfg)

    work = Path(cfg.workdir)
    manifest = json.loads((work / "shards" / "manifest.json").read_text())
    assert manifest["totals"]["ok"] == 80 and len(manifest["shards"]) == 2
    assert (work / "export" / "model.safetensors").is_file()
    assert any(p.name.startswith("step_") for p in (work / "checkpoints").iterdir())
    report = (work / "transfer" / "report.md").read_text()
    assert "| digits |" in report
    assert {"shard", "pretrain", "transfer"} <= set(first)
    assert "mlflow ui --backend-store-uri sqlite:" in first["summary"]

    client = mlflow.MlflowClient(tracking_uri(cfg.tracking, cfg.workdir))
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id], max_results=200)
    parents = [r for r in runs if r.data.tags.get("vitscale.stage") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == first["run_id"]]
    assert sorted(r.data.tags["vitscale.stage"] for r in children) == ["pretrain", "shard", "transfer"]
    assert all(r.info.status == "FINISHED" for r in children)
    pretrain_run = next(r for r in children if r.data.tags["vitscale.stage"] == "pretrain")
    assert "curves.png" in [f.path for f in client.list_artifacts(pretrain_run.info.run_id)]
    assert (work / "logs" / "curves.png").is_file()

    second = run_pipeline(cfg)
    assert [second[s] for s in ("shard", "pretrain", "transfer")] == ["skipped"] * 3
    runs = client.search_runs([exp.experiment_id], max_results=200)
    assert not [r for r in runs if r.data.tags.get("mlflow.parentRunId") == second["run_id"]]
    assert "| digits |" in second["summary"]
