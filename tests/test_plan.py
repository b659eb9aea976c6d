"""The capacity plan against arithmetic written out here, for the paper's ViT-L/16 on 300M images."""
from __future__ import annotations

import json

import pytest

from pipelines import cli
from pipelines.config import load_config, replace
from pipelines.plan import INTERCONNECTS, make_plan, model_state_bytes, record_loader_rate, record_mfu
from pretrain.flops import BY_KEY, GPUS, accelerator_for

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
    assert plan["fits"]
    # the JFT recipe's 4096 over 256 GPUs leaves 16 images per GPU: the plan says so and what would do
    (warning,) = [w for w in plan["warnings"] if not w.startswith("transfer")]
    assert warning.startswith("micro-batch 16 (3,152 tokens per GPU per pass) is too small for good MFU")
    assert "run on 64 GPUs at pretrain.micro_batch=64" in warning


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


def _l16_jft(*overrides: str):
    return load_config("vit_l16_jft", [f"pretrain.num_classes={CLASSES}", *overrides])


@pytest.mark.parametrize("fabric, bus_gb, dominates", [("tcp-100g", 100 / 8, True), ("ib-ndr", 8 * 400 / 8, False),
                                                       ("efa-p5", 3200 / 8, False), ("12.5", 8 * 12.5, False)])
def test_gradient_traffic_beside_compute(no_measurements, fabric, bus_gb, dominates):
    """ZeRO-2 on 32 x 8 GPUs: a reduce-scatter of the bf16 gradients and an all-gather of the parameters,
    (N-1)/N x 2P bytes each, through the node's network (per-GPU rate x 8 GPUs per node)."""
    plan = make_plan(_l16_jft(), IMAGES, NODES, GPUS_PER_NODE, "h100", None, 1, interconnect=fabric)
    P, N = plan["params"], NODES * GPUS_PER_NODE
    one = (N - 1) / N * 2 * P / (bus_gb * 1e9)
    compute = 16 * 6 * plan["macs_per_image"] / (989e12 * 0.40)  # micro-batch 16, accumulation 1
    assert plan["grad_bytes"] == 2 * P and plan["bus_gb_per_s"] == pytest.approx(bus_gb)
    assert plan["compute_s"] == pytest.approx(compute, rel=1e-12)
    assert plan["comm_s"] == pytest.approx(2 * one, rel=1e-12)
    # the reduce-scatter hides behind the backward (2/3 of the compute); the all-gather follows the step
    assert plan["hidden_comm_s"] == pytest.approx(min(one, 2 / 3 * compute), rel=1e-12)
    assert plan["step_s"] == pytest.approx(compute + 2 * one - min(one, 2 / 3 * compute), rel=1e-12)
    assert plan["images_per_s_with_comm"] == pytest.approx(plan["images_per_s"] * compute / plan["step_s"])
    assert any(w.startswith("communication dominates") for w in plan["warnings"]) == dominates


def test_all_reduce_zero3_and_one_node(no_measurements):
    plan = make_plan(_l16_jft("pretrain.zero_stage=1"), IMAGES, 4, 8, "a100", 0.5, 1, interconnect="ib-hdr")
    P, N = plan["params"], 32
    assert plan["bus_gb_per_s"] == 8 * 200 / 8 and "all-reduce" in plan["comm_pattern"]
    assert plan["comm_s"] == pytest.approx(2 * (N - 1) / N * 2 * P / 200e9, rel=1e-12)
    cfg = _l16_jft("pretrain.zero_stage=3", "model.act_checkpoint=true", "pretrain.micro_batch=32",
                  "pretrain.workers=32")
    plan = make_plan(cfg, IMAGES, 4, 8, "h100", None, 1, interconnect="ib-ndr")
    accum = 4096 // (32 * 32)
    # per micro-batch: gathers for the forward, the backward and the recomputation, one reduce-scatter
    assert plan["comm_s"] == pytest.approx(accum * 4 * (N - 1) / N * 2 * P / 400e9, rel=1e-12)
    assert plan["exposed_comm_s"] == max(0.0, plan["comm_s"] - plan["compute_s"])
    one_node = make_plan(_l16_jft(), IMAGES, 1, 8, "h200", None, 1, interconnect="tcp-25g")
    assert one_node["bus_gb_per_s"] == BY_KEY["h200"].nvlink_gbs  # no network inside one node


def test_transfer_memory_and_time_per_cell(no_measurements):
    """ViT-L/16 fine-tuned at 384 px (577 tokens, no pre-logits), SGD with momentum under ZeRO-2 over
    transfer.workers ranks; each cell is the paper's steps at transfer.batch."""
    cfg = _l16_jft("transfer.workers=8", "transfer.micro_batch=16", "transfer.datasets=[cifar10, pets]")
    t = make_plan(cfg, IMAGES, NODES, GPUS_PER_NODE, "h100", None, 1)["transfer"]
    d, depth, m, tokens = 1024, 24, 4096, (384 // 16) ** 2 + 1
    assert t["tokens"] == tokens and t["micro_batch"] == 16 and t["grad_accum"] == 512 // (16 * 8)
    P = t["params"]  # 37 classes at most (pets): no pre-logits, head of 1024 x 37
    assert t["model_state_bytes"] == pytest.approx(P * (2 + (2 + 8) / 8), rel=1e-12)
    assert t["activation_bytes"] == depth * tokens * 16 * (18 * d + 4 * m)
    assert t["memory_bytes_per_gpu"] == t["model_state_bytes"] + t["activation_bytes"] and t["fits"]
    rows = {r["dataset"]: r for r in t["rows"]}
    assert rows["cifar10"]["steps"] == 10_000 and rows["pets"]["steps"] == 500
    assert rows["cifar10"]["cells"] == 5  # four LRs on the dev split, then the retrain on train + dev
    from pretrain.model import ViT, ViTConfig, macs_per_image

    vit = ViTConfig.from_variant("L/16", num_classes=10, img_size=384)
    per_cell = 10_000 * 512 * 6 * macs_per_image(vit) / (8 * 989e12 * 0.40)
    assert rows["cifar10"]["cell_s"] == pytest.approx(per_cell, rel=1e-12)
    assert t["gpu_hours"] == pytest.approx(sum(r["cells"] * r["cell_s"] * 8 for r in rows.values()) / 3600)
    with __import__("torch").device("meta"):
        assert P == sum(q.numel() for q in ViT(ViTConfig.from_variant("L/16", num_classes=37, img_size=384)).parameters())

    too_big = make_plan(_l16_jft("transfer.workers=1", "transfer.micro_batch=null"), IMAGES, NODES, GPUS_PER_NODE, "h100", None, 1)
    assert any(w.startswith("transfer:") and "transfer.micro_batch" in w for w in too_big["warnings"])


def test_model_state_formula_by_optimizer():
    P, N = 1000, 10
    assert [model_state_bytes(P, N, k, "bf16") for k in range(4)] == pytest.approx(
        [16 * P, 4 * P + 12 * P / N, 2 * P + 14 * P / N, 16 * P / N])
    assert [model_state_bytes(P, N, k, "bf16", "sgd") for k in range(4)] == pytest.approx(
        [12 * P, 4 * P + 8 * P / N, 2 * P + 10 * P / N, 12 * P / N])
    assert [model_state_bytes(P, N, k, "fp32") for k in range(4)] == pytest.approx(
        [16 * P, 8 * P + 8 * P / N, 4 * P + 12 * P / N, 16 * P / N])


def test_one_peak_table_for_the_meter_the_benches_and_the_plan(no_measurements):
    for g in GPUS:
        assert accelerator_for(f"NVIDIA {g.device_name} 80GB HBM3") is g
        plan = make_plan(_l16_jft(), IMAGES, 1, 8, g.key, 0.5, 1)
        assert plan["peak_tflops"] == g.bf16_tflops and plan["gpu_memory_bytes"] == g.memory_gb * 1e9
    assert accelerator_for("NVIDIA H100 PCIe").key == "h100-pcie"
    assert make_plan(_l16_jft("pretrain.precision=fp32"), IMAGES, 1, 8, "a100", 0.5, 1)["peak_tflops"] == 156.0


def test_cli_network_warning_and_transfer_memory(no_measurements, capsys):
    """The issue's two commands: TCP warns that communication dominates, InfiniBand NDR does not; both
    print the transfer stage's memory per GPU."""
    args = ["plan", "vit_l16_jft", "--images", "300e6", "--nodes", "32", "--gpus-per-node", "8", "--gpu", "h100"]
    outs = {}
    for fabric in ("tcp-100g", "ib-ndr"):
        assert cli.main(args + ["--interconnect", fabric]) == 0
        outs[fabric] = capsys.readouterr().out
    assert "! communication dominates" in outs["tcp-100g"]
    assert "communication dominates" not in outs["ib-ndr"]
    for out in outs.values():
        assert "Transfer (fine-tuning at 384 px" in out and "memory per GPU: model states" in out
        assert "! micro-batch 16 (3,152 tokens per GPU per pass) is too small" in out
    assert f"Network (tcp-100g: {INTERCONNECTS['tcp-100g'].what}; given)" in outs["tcp-100g"]
    assert cli.main(args) == 0
    assert "Network (ib-ndr" in (out := capsys.readouterr().out) and "assumed: pass --interconnect" in out
    assert cli.main(args + ["--interconnect", "fast"]) == 2
    assert "--interconnect fast" in capsys.readouterr().err
