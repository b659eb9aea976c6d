"""The capacity plan against arithmetic written out here, for the paper's ViT-L/16 on 300M images."""
from __future__ import annotations

import json

import pytest

from pipelines import cli
from pipelines.config import load_config, replace
from pipelines.plan import make_plan, record_loader_rate, record_mfu

IMAGES = 300_000_000
NODES, GPUS_PER_NODE = 32, 8
CLASSES = 18_291  # JFT-300M's label count


@pytest.fixture
def no_measurements(tmp_path, monkeypatch):
    monkeypatch.setenv("VITSCALE_MEASURED", str(tmp_path / "measured"))
    return tmp_path / "measured"


def _vit_l16_by_hand() -> dict:
    """ViT-L/16 at 224 px, class token, 1024-wide pre-logits, 18,291 classes, written out layer by layer."""
    d, depth, m, p, c = 1024, 24, 4096, 16, CLASSES
    n = (224 // 16) ** 2  # 196 patches
    t = n + 1  # + class token
    params = (
        3 * p * p * d + d  # patch embedding conv
        + d  # class token
        + t * d  # position embeddings
        + depth * (2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * m + m) + (m * d + d))
        + 2 * d  # final LayerNorm
        + d * d + d  # pre-logits
        + d * c + c  # head
    )
    macs = (
        n * d * 3 * p * p  # patch embedding
        + depth * (t * d * 3 * d + t * t * d + t * t * d + t * d * d + t * d * m + t * m * d)  # qkv, QK^T, AV, proj, MLP
        + d * d  # pre-logits
        + d * c  # head
    )
    return {"params": params, "macs": macs, "tokens": t, "width": d, "mlp": m, "depth": depth}


def test_vit_l16_on_300m_images_matches_hand_arithmetic(no_measurements):
    cfg = replace(load_config("vit_l16_jft"), **{"pretrain.num_classes": CLASSES})
    plan = make_plan(cfg, IMAGES, NODES, GPUS_PER_NODE, "h100", None, 7, loader_rate=500.0)
    hand = _vit_l16_by_hand()
    gpus = 32 * 8
    assert plan["params"] == hand["params"]
    assert plan["macs_per_image"] == hand["macs"]

    flops = 2 * hand["macs"] * 3  # forward + backward (2x forward); no activation checkpointing in this preset
    images_per_s = gpus * 989e12 * 0.40 / flops  # H100 bf16 dense peak, the assumed 40 % MFU
    epoch_s = IMAGES / images_per_s
    assert plan["mfu"] == 0.40 and plan["mfu_source"] == "assumed"
    assert plan["train_flops_per_image"] == flops
    assert plan["images_per_s"] == pytest.approx(images_per_s, rel=1e-12)
    assert plan["seconds_per_epoch"] == pytest.approx(epoch_s, rel=1e-12)
    assert plan["gpu_hours"] == pytest.approx(7 * epoch_s / 3600 * gpus, rel=1e-12)
    assert plan["cpu_cores"] == pytest.approx(images_per_s / 500.0, rel=1e-12)
    assert plan["cpu_cores_per_node"] == pytest.approx(images_per_s / 500.0 / 32, rel=1e-12)
    assert plan["steps_per_epoch"] == pytest.approx(IMAGES / 4096)
    assert plan["grad_accum"] == 1  # 4096 = 16 x 256 x 1

    assert plan["shards"] == 30_000  # 300M / 10,000 per shard
    jpeg = 256 * (256 * 4 / 3) * 3.0 / 8  # shorter side 256 at 4:3, q95 assumed at 3 bits per pixel
    tar = 3 * 512 + 512 + 512 + 256  # headers, padded .cls and .json, half a block after the JPEG
    assert plan["bytes_per_image"] == pytest.approx(jpeg + tar, rel=1e-12)
    assert plan["storage_bytes"] == pytest.approx(IMAGES * (jpeg + tar), rel=1e-12)
    assert plan["read_bytes_per_s"] == pytest.approx(images_per_s * (jpeg + tar), rel=1e-12)

    P, N = hand["params"], gpus
    assert plan["model_state_bytes_by_stage"] == pytest.approx(
        {0: 16 * P, 1: 4 * P + 12 * P / N, 2: 2 * P + 14 * P / N, 3: 16 * P / N}, rel=1e-12)
    assert plan["zero_stage"] == 2
    acts = hand["depth"] * hand["tokens"] * 16 * (18 * hand["width"] + 4 * hand["mlp"])  # micro-batch 16, bf16
    assert plan["activation_bytes"] == acts
    assert plan["memory_bytes_per_gpu"] == pytest.approx(2 * P + 14 * P / N + acts, rel=1e-12)
    assert plan["fits"] and plan["warnings"] == []


def test_checkpointing_and_zero3_figures(no_measurements):
    cfg = load_config("vit_l16_jft", ["model.act_checkpoint=true", "pretrain.zero_stage=3",
                                      "pretrain.workers=16", "pretrain.micro_batch=32", "pretrain.global_batch=4096"])
    plan = make_plan(cfg, 1_000_000, 2, 8, "a100", 0.5, 1)
    hand = _vit_l16_by_hand()
    P = plan["params"]
    assert plan["train_flops_per_image"] == 2 * plan["macs_per_image"] * 3  # model FLOPs: what MFU counts
    assert plan["hardware_flops_per_image"] == 2 * plan["macs_per_image"] * 4  # one more forward on the GPUs
    assert plan["images_per_s"] == pytest.approx(16 * 312e12 * 0.5 / (6 * plan["macs_per_image"]), rel=1e-12)
    assert plan["model_state_bytes"] == pytest.approx(16 * P / 16, rel=1e-12)
    t, d, m = hand["tokens"], hand["width"], hand["mlp"]
    assert plan["activation_bytes"] == 24 * t * 32 * 2 * d + t * 32 * (18 * d + 4 * m)
    assert plan["grad_accum"] == 8 and plan["mfu_source"] == "given"


def test_warnings_name_the_keys(no_measurements):
    cfg = load_config("vit_l16_jft", ["pretrain.zero_stage=0", "pretrain.micro_batch=512", "pretrain.workers=8"])
    plan = make_plan(cfg, IMAGES, 3, 8, "h100", None, 1)  # 24 GPUs: 4096 / (512 x 24) is no integer
    text = " ".join(plan["warnings"])
    assert not plan["fits"]
    assert "pretrain.workers" in text and "pretrain.global_batch" in text and "does not fit" in text


def test_cli_says_assumed_or_measured(no_measurements, capsys):
    args = ["plan", "vit_l16_jft", "--images", "300e6", "--nodes", "32", "--gpus-per-node", "8", "--gpu", "h100"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "MFU 40% (assumed)" in out and "images/s per core (assumed)" in out
    assert "30,000 of 10,000 samples" in out

    record_mfu("L/16", "NVIDIA H100 80GB HBM3", 0.45)
    record_mfu("L/16", "NVIDIA H100 80GB HBM3", 0.5)  # replaces the first
    record_mfu("B/16", "NVIDIA H100 80GB HBM3", 0.6)
    record_mfu("L/16", "NVIDIA A100-SXM4-80GB", 0.55)
    record_loader_rate(700.0, command="vitscale bench loader")
    assert len(json.loads((no_measurements / "train.json").read_text())) == 3
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    expected = make_plan(load_config("vit_l16_jft"), IMAGES, 32, 8, "h100", 0.5, 1, 700.0)
    assert "MFU 50% (measured" in out and "700 images/s per core (measured" in out
    assert f"{expected['images_per_s']:,.0f} images/s" in out
    assert f"CPU cores to feed the GPUs: {expected['cpu_cores']:,.0f} in all" in out

    assert cli.main(args + ["--mfu", "0.3"]) == 0
    assert "MFU 30% (given (--mfu))" in capsys.readouterr().out


@pytest.mark.parametrize("extra, key", [(["--gpu", "v100"], "--gpu"), (["--mfu", "1.5"], "--mfu"),
                                        (["--nodes", "0"], "--nodes"), (["--epochs", "0"], "--epochs")])
def test_bad_arguments_exit_2(no_measurements, capsys, extra, key):
    args = ["plan", "vit_l16_jft", "--images", "300e6", "--nodes", "32"]
    assert cli.main(args + extra) == 2
    assert key in capsys.readouterr().err
