"""Pretraining end to end on 2 CPU workers: real Ray Train, real DeepSpeed (gloo), real tar shards.

Each Ray Train job runs beside a ``torchrun`` twin of the same config (ZeRO 1 here, ZeRO 2 on a 2-node
cluster, ZeRO 3 in test_tracking.py under a real MLflow server): the loss falls and the two loss curves
are identical (same seed, same curve; the loop does not depend on its launcher). A NaN loss fails the
MLflow run and names the step.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipelines.config import Config, load_config, replace
from pipelines.train_job import cli_main, pretrain_complete, run_pretrain, write_resolved_config
from pipelines.tracking import client_for

REPO = Path(__file__).resolve().parents[1]
COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (200, 200, 40)]  # a task a tiny ViT learns in steps
STEPS = 8


def write_shards(root: Path, shards: int = 2, per_shard: int = 48) -> Path:
    """Noisy single-colour JPEGs in 4 classes, as webdataset tars with a manifest (the shard stage's layout)."""
    root.mkdir(parents=True, exist_ok=True)
    rng, entries = np.random.default_rng(0), []
    for s in range(shards):
        name = f"{s:06d}.tar"
        with wds.TarWriter(str(root / name)) as tw:
            for i in range(per_shard):
                label = (s * per_shard + i) % len(COLOURS)
                pixels = np.clip(np.array(COLOURS[label]) + rng.normal(0, 40, (24, 24, 3)), 0, 255)
                buf = io.BytesIO()
                Image.fromarray(pixels.astype(np.uint8)).save(buf, "JPEG", quality=90)
                tw.write({"__key__": f"{s:06d}_{i:06d}", "jpg": buf.getvalue(), "cls": str(label).encode()})
        entries.append({"name": name, "samples": per_shard})
    (root / "manifest.json").write_text(json.dumps({"shards": entries, "label_names": ["r", "g", "b", "y"]}))
    return root


def train_config(workdir: Path, shards: Path, stage: int = 2, **pretrain) -> Config:
    """A tiny ViT (mu/4 at 16 px) on 2 workers, 2 micro-batches of 4 per step, every step logged."""
    settings = dict(shards=str(shards), workers=2, global_batch=16, micro_batch=4, steps=STEPS, lr=3e-3,
                    warmup_steps=1, schedule="cosine", precision="bf16", zero_stage=stage, loader_workers=0,
                    shuffle_buffer=32, log_every=1, checkpoint_every=1000, max_failures=0)
    settings.update(pretrain)
    overrides = {"name": "t", "workdir": str(workdir), "model.variant": "mu/4", "model.img_size": 16,
                 **{f"pretrain.{k}": v for k, v in settings.items()}}
    return replace(load_config("local"), **overrides)


def logged(workdir: Path) -> list[dict]:
    """Rank 0's metric records ({workdir}/logs/pretrain.jsonl)."""
    path = Path(workdir) / "logs" / "pretrain.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def loss_curve(workdir: Path) -> list[float]:
    return [r["loss"] for r in logged(workdir) if "loss" in r]


def start_torchrun(cfg: Config, log: Path) -> subprocess.Popen:
    """``torchrun --nproc_per_node 2 -m pretrain.launch --config FILE`` on the resolved config."""
    path = write_resolved_config(cfg)
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "pretrain.launch",
                             "--config", path], cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def run_twins(cfg_ray: Config, cfg_torchrun: Config, run, log: Path):
    """Start ``torchrun`` on ``cfg_torchrun``, call ``run(cfg_ray)`` (a Ray Train job) meanwhile, and
    return its result once both finished."""
    proc = start_torchrun(cfg_torchrun, log)
    try:
        result = run(cfg_ray)
    finally:
        rc = proc.wait(timeout=300)
    assert rc == 0, log.read_text()[-3000:]
    return result


def check_trained(cfg_ray: Config, cfg_torchrun: Config, result: dict) -> None:
    """The loss fell; the two launchers gave the same curve bit for bit; metrics, checkpoint, export."""
    ray_curve, torchrun_curve = loss_curve(cfg_ray.workdir), loss_curve(cfg_torchrun.workdir)
    steps = cfg_ray.pretrain.steps
    assert len(ray_curve) == steps
    assert ray_curve == torchrun_curve  # same seed, same data order, same arithmetic
    assert np.mean(ray_curve[-2:]) < 0.85 * ray_curve[0], ray_curve
    assert result["step"] == steps and result["metrics"]["loss"] == ray_curve[-1]
    for key in ("lr", "grad_norm", "img_per_s", "tflops_per_device", "data_wait_frac", "loader_skipped_corrupt",
                "mem_peak_rss_gib"):
        assert key in result["metrics"], key
    assert pretrain_complete(cfg_ray) and pretrain_complete(cfg_torchrun)
    assert not pretrain_complete(replace(cfg_ray, **{"pretrain.steps": steps + 1}))
    assert (Path(cfg_ray.workdir) / "checkpoints" / f"step_{steps:08d}").is_dir()
    from PIL import Image

    from pretrain.curves import DPI, FIGSIZE

    with Image.open(Path(cfg_ray.workdir) / "logs" / "curves.png") as png:  # drawn beside the metrics file
        assert png.format == "PNG" and png.size == (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))

    import torch

    from pretrain.convert import load_safetensors

    model, vit = load_safetensors(result["export_dir"])
    assert vit.num_classes == 4 and model(torch.zeros(2, 3, 16, 16)).shape == (2, 4)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards"))


@pytest.mark.timeout(400)
def test_zero1_trains_identically_under_ray_train_and_torchrun(shards, ray_local, tmp_path):
    cfg_ray, cfg_torchrun = (train_config(tmp_path / w, shards, stage=1) for w in ("ray", "torchrun"))
    result = run_twins(cfg_ray, cfg_torchrun, run_pretrain, tmp_path / "torchrun.log")
    check_trained(cfg_ray, cfg_torchrun, result)
    assert len(set(result["nodes"])) == 1


@pytest.mark.timeout(400)
def test_zero2_on_a_two_node_cluster_one_worker_per_node(shards, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    cfg_ray, cfg_torchrun = (train_config(tmp_path / w, shards, stage=2) for w in ("ray", "torchrun"))
    ray.shutdown()  # the session's local Ray; the next test that needs it starts it again
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2
        result = run_twins(cfg_ray, cfg_torchrun, run_pretrain, tmp_path / "torchrun.log")
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert set(result["nodes"]) == nodes  # one CPU per node and per worker: one worker on each node
    check_trained(cfg_ray, cfg_torchrun, result)


@pytest.mark.timeout(300)
def test_nan_loss_stops_the_run_naming_the_step_and_the_mlflow_run_is_failed(shards, ray_local, tmp_path):
    # LR 0, 0, then 5e29 (warmup): step 3's update blows the weights up, so step 4's loss is not finite.
    cfg = train_config(tmp_path, shards, lr=1e30, steps=6)
    with pytest.raises(Exception, match=r"loss is (nan|inf) at step 4"):
        cli_main(cfg, None)
    client = client_for(cfg)
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.params["pretrain.lr"] == "1e+30"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == [1, 2, 3]


@pytest.mark.timeout(300)
def test_compiled_blocks_train_under_torchrun(shards, tmp_path):
    """``model.compile`` on the real path: stochastic depth, ZeRO 2, bf16; the export is the eager model's."""
    cfg = replace(train_config(tmp_path / "w", shards, stage=2), **{"model.compile": True, "model.drop_path": 0.1})
    log = tmp_path / "torchrun.log"
    assert start_torchrun(cfg, log).wait(timeout=300) == 0, log.read_text()[-3000:]
    assert "ZeRO 2, bf16, blocks compiled" in log.read_text()
    curve = loss_curve(cfg.workdir)
    assert len(curve) == STEPS and np.mean(curve[-2:]) < 0.85 * curve[0], curve
    import torch

    from pretrain.convert import load_safetensors

    model, _ = load_safetensors(Path(cfg.workdir) / "export")
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 4)


def test_resolved_config_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = replace(load_config("local"), **{"workdir": "runs/x", "pretrain.shards": "data/{000000..000003}.tar",
                                            "transfer.data_root": "s3://bucket/datasets"})
    path = Path(write_resolved_config(cfg))
    assert path == tmp_path / "runs" / "x" / "config.resolved.yaml"
    import yaml

    data = yaml.safe_load(path.read_text())
    assert data["workdir"] == str(tmp_path / "runs" / "x")
    assert data["pretrain"]["shards"] == str(tmp_path / "data" / "{000000..000003}.tar")
    assert data["transfer"]["data_root"] == "s3://bucket/datasets"
    assert replace(cfg, **{"workdir": data["workdir"], "pretrain.shards": data["pretrain"]["shards"]}) == \
        load_config(str(path))  # the file is a complete config vitscale itself reads back
