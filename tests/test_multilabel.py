"""Multi-label pretraining end to end, JFT-style: a jsonl index whose label cells are lists, sharded
with a held-out part, trained with the sigmoid loss on 2 Ray Train workers (real DeepSpeed ZeRO 2):
the loss falls and precision@1 on the held-out shards reaches MLflow; a softmax run on the same
shards is refused with exit 2, naming pretrain.loss. With activation checkpointing, the logged MFU
is 3/4 of the logged HFU at every step."""
from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
from PIL import Image

from pipelines.cli import main as cli
from pipelines.config import load_config
from pipelines.shard import run_shard_stage
from pipelines.tracking import tracking_uri
from test_train_job import COLOURS, logged

STEPS = 12


def _two_colour_index(root) -> str:
    """Images with a left and a right half in two of 4 colours; labels: both colours' names."""
    rng, rows = np.random.default_rng(0), []
    root.mkdir()
    for i in range(96):
        a, b = rng.choice(len(COLOURS), 2, replace=False)
        pixels = np.zeros((24, 24, 3))
        pixels[:, :12], pixels[:, 12:] = COLOURS[a], COLOURS[b]
        pixels = np.clip(pixels + rng.normal(0, 20, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{i:03d}.jpg", quality=90)
        rows.append({"path": f"{i:03d}.jpg", "label": [f"colour{a}", f"colour{b}"]})
    (root / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root / "index.jsonl")


@pytest.mark.timeout(600)
def test_sigmoid_pretraining_on_label_lists_logs_precision_at_1(ray_local, tmp_path, capsys):
    base = [f"workdir={tmp_path / 'wd'}", "tracking.experiment=multi", "model.variant=mu/4", "model.img_size=16",
            "shard.image_size=24", "shard.samples_per_shard=24", "shard.holdout=24",
            "pretrain.workers=2", "pretrain.zero_stage=2", "pretrain.precision=fp32", "pretrain.global_batch=16",
            "pretrain.micro_batch=8", f"pretrain.steps={STEPS}", "pretrain.lr=3e-2", "pretrain.warmup_steps=1",
            "pretrain.log_every=1", f"pretrain.eval_every={STEPS // 2}", "pretrain.loader_workers=0",
            "pretrain.checkpoint_every=1000", "pretrain.max_failures=0", "pretrain.shuffle_buffer=24",
            "pretrain.augment.crop=center", "pretrain.augment.flip=false",
            "model.act_checkpoint=true", "pretrain.peak_tflops=1.0"]  # a peak: MFU and HFU are logged on the CPU
    cfg = load_config("local", [*base, f"shard.source={_two_colour_index(tmp_path / 'images')}"])
    manifest = run_shard_stage(cfg)
    assert manifest["label_kind"] == "multi" and manifest["num_classes"] == 4 and len(manifest["holdout"]) == 1

    softmax = ["pretrain", "local", *(f"--set={o}" for o in [*base, f"shard.source={cfg.shard.source}"])]
    assert cli(softmax) == 2
    assert "pretrain.loss: softmax takes one label per image" in capsys.readouterr().err

    assert cli([*softmax, "--set=pretrain.loss=sigmoid", "--set=pretrain.label_key=json:labels"]) == 0
    records = logged(tmp_path / "wd")
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == STEPS and np.mean(losses[-3:]) < 0.5 * losses[0], losses
    evals = [r for r in records if "val_prec1" in r]
    assert [r["step"] for r in evals] == [STEPS // 2, STEPS] and all(r["val_samples"] == 24 for r in evals)
    assert evals[-1]["val_prec1"] >= 0.5  # the top class is one of the image's two colours
    steps = [r for r in records if "mfu" in r]
    assert len(steps) == STEPS and all(r["mfu"] == pytest.approx(0.75 * r["hfu"], rel=1e-9) for r in steps)
    client = mlflow.MlflowClient(tracking_uri(cfg.tracking, cfg.workdir))
    (run,) = [r for r in client.search_runs([client.get_experiment_by_name("multi").experiment_id])
              if r.info.status == "FINISHED"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_prec1")] == [STEPS // 2, STEPS]
