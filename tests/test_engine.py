"""The engine's pure parts, in-process: FLOP counts, MFU, parameter groups, the DeepSpeed config, the
launcher seam. The multi-process training itself is in test_train_job.py."""
from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipelines.config import PretrainConfig, load_config, replace
from pretrain.ds_config import deepspeed_config, grad_accum_steps
from pretrain.ds_config import merge as _merge
from pretrain.engine import param_groups, vit_config
from pretrain.errors import InputError
from pretrain.launch import job_from_resolved, read_job
from pretrain.loop import _check_finite
from pretrain.metrics import (PEAK_TFLOPS, Meter, detect_peak_tflops, hardware_flops_per_image,
                              model_flops_per_image)
from pretrain.model import ViT, ViTConfig, macs_per_image

REPO = Path(__file__).resolve().parents[1]


def test_vit_b16_flops_match_published_17_6_gmacs():
    b16 = ViTConfig.from_variant("B/16", num_classes=1000, img_size=224)
    assert macs_per_image(b16) == pytest.approx(17.6e9, rel=0.01)
    # 2 FLOPs per MAC; forward + backward = 3 forwards; recomputing activations adds one forward, which
    # the device runs (HFU) but the model does not need (MFU, as PaLM defines it).
    assert model_flops_per_image(b16) == 6 * macs_per_image(b16)
    assert hardware_flops_per_image(b16, act_checkpoint=False) == 6 * macs_per_image(b16)
    assert hardware_flops_per_image(b16, act_checkpoint=True) == 8 * macs_per_image(b16)


def test_with_activation_checkpointing_mfu_is_three_quarters_of_hfu_for_the_same_step():
    b16 = ViTConfig.from_variant("B/16", num_classes=1000, img_size=224)
    meter = Meter(model_flops_per_image(b16), 8, 989.0, hardware_flops_per_image(b16, act_checkpoint=True))
    meter.add(images=2048, data_s=0.0)
    out = meter.report()
    assert out["mfu"] == pytest.approx(0.75 * out["hfu"], rel=1e-12)
    assert out["hardware_tflops_per_device"] == pytest.approx(out["tflops_per_device"] * 4 / 3, rel=1e-12)


def test_meter_mfu_is_achieved_tflops_over_the_peak():
    meter = Meter(flops_per_image=1e12, world_size=4, peak_tflops=989.0)
    meter.add(images=400, data_s=0.0)
    with meter.excluded():  # evaluation and checkpoints do not count against training throughput
        time.sleep(0.02)
    assert meter.excluded_s >= 0.02
    out = meter.report()
    assert out["tflops_per_device"] == pytest.approx(out["img_per_s"] * 1e12 / 4 / 1e12)
    assert out["mfu"] == pytest.approx(out["tflops_per_device"] / 989.0)
    assert 0.0 <= out["data_wait_frac"] <= 1.0
    assert "mfu" not in Meter(1e9, 1, None).report()  # no peak known (the CPU): no MFU
    assert detect_peak_tflops("cpu") is None
    assert PEAK_TFLOPS["H100"] == PEAK_TFLOPS["H200"] == 989.0 and PEAK_TFLOPS["A100"] == 312.0


def test_weight_decay_skips_biases_norms_pos_embed_and_cls_token():
    model = ViT(ViTConfig.from_variant("mu/4", num_classes=5, img_size=16))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"pos_embed", "cls_token", "norm.weight", "norm.bias", "blocks.0.norm1.weight",
            "blocks.0.attn.qkv.bias", "head.bias", "patch_embed.bias"} <= skipped
    assert {"patch_embed.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight", "head.weight"} <= decayed
    assert all(n.endswith("weight") and "norm" not in n for n in decayed)
    assert len(skipped) + len(decayed) == len(names)


def _pretrain(**overrides):
    return replace(load_config("local"), **{f"pretrain.{k}": v for k, v in overrides.items()}).pretrain


def test_deepspeed_config_from_ours():
    p = _pretrain(global_batch=64, micro_batch=8, workers=2, zero_stage=3, precision="bf16",
                  schedule="linear", warmup_steps=5, steps=50, grad_clip=0.5, lr=0.002, weight_decay=0.05)
    ds = deepspeed_config(p, world_size=2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (64, 8, 4)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["type"] == "AdamW"
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.999] and ds["optimizer"]["params"]["weight_decay"] == 0.05
    assert ds["scheduler"] == {"type": "WarmupDecayLR", "params": {
        "total_num_steps": 50, "warmup_num_steps": 5, "warmup_min_lr": 0.0, "warmup_max_lr": 0.002,
        "warmup_type": "linear"}}
    # Under another launcher the world size actually running decides the accumulation.
    assert deepspeed_config(p, world_size=8)["gradient_accumulation_steps"] == 1
    with pytest.raises(InputError, match="pretrain.global_batch"):
        grad_accum_steps(p, world_size=3)

    cos = deepspeed_config(_pretrain(schedule="cosine", precision="fp32", warmup_steps=0), world_size=2)
    assert cos["scheduler"]["type"] == "WarmupCosineLR" and cos["scheduler"]["params"]["warmup_num_steps"] == 1
    assert not cos["bf16"]["enabled"] and not cos["fp16"]["enabled"]


def test_raw_deepspeed_keys_are_merged_last_and_deep():
    raw = {"zero_optimization": {"stage": 1, "overlap_comm": False}, "gradient_clipping": 0.25,
           "optimizer": {"params": {"eps": 1e-6}}}
    ds = deepspeed_config(_pretrain(zero_stage=3, deepspeed=raw), world_size=2)
    assert ds["zero_optimization"] == {"stage": 1, "overlap_comm": False}
    assert ds["gradient_clipping"] == 0.25
    assert ds["optimizer"]["params"]["eps"] == 1e-6 and ds["optimizer"]["params"]["lr"] == 1e-3
    assert _merge({"a": {"b": 1}}, {"a": {"c": 2}}) == {"a": {"b": 1, "c": 2}}


def test_non_finite_loss_names_the_step():
    _check_finite(torch.tensor(1.5), 3)
    with pytest.raises(FloatingPointError, match="at step 7"):
        _check_finite(torch.tensor(float("nan")), 7)
    with pytest.raises(FloatingPointError, match="inf at step 9"):
        _check_finite(torch.tensor(math.inf), 9)


def test_launch_builds_the_typed_job_from_the_resolved_config_and_names_bad_keys(tmp_path):
    import yaml

    from pipelines.train_job import resolved_config

    cfg = replace(load_config("local"), **{"model.variant": "mu/4", "model.img_size": 16})
    path = tmp_path / "resolved.yaml"
    path.write_text(yaml.safe_dump(resolved_config(cfg)))
    job = read_job(str(path))
    # The worker side gets exactly the typed slices the driver validated.
    assert (job.model, job.pretrain, job.seed) == (cfg.model, cfg.pretrain, cfg.seed)
    assert vit_config(job.model, 7) == vit_config(cfg.model, 7)
    bad = resolved_config(cfg)
    bad["pretrain"]["micro_bach"] = 4
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(InputError, match="resolved.yaml: pretrain.micro_bach: unknown key"):
        read_job(str(path))
    with pytest.raises(InputError, match="mine.yaml: workdir: missing"):
        job_from_resolved({"pretrain": {"lr": 0.1}, "model": {}}, "mine.yaml")
    with pytest.raises(InputError, match="not found"):
        read_job(str(tmp_path / "nope.yaml"))


def test_deepspeed_config_of_the_typed_slice():
    p = dataclasses.replace(PretrainConfig(), global_batch=8, micro_batch=4, steps=3, lr=0.1, betas=(0.9, 0.95),
                            weight_decay=0.0, warmup_steps=1, schedule="cosine", precision="fp32", zero_stage=0,
                            use_gpu=True, workers=1)
    ds = deepspeed_config(p, world_size=1)
    assert ds["gradient_accumulation_steps"] == 2 and ds["optimizer"]["params"]["fused"] is True


def test_compiled_blocks_match_eager_share_one_graph_and_keep_names():
    import copy

    import torch._dynamo
    import torch._inductor.config
    from torch._dynamo.utils import counters

    from pretrain.parallelize import apply_act_checkpoint, compile_blocks

    torch.manual_seed(0)
    eager = ViT(ViTConfig.from_variant("tiny/4", img_size=16, num_classes=5, drop_path=0.2)).train()
    for p in eager.parameters():  # a non-zero head, so every gradient is non-trivial
        p.data.add_(torch.randn_like(p) * 0.02)
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints and exports unchanged
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    grads = []
    torch._dynamo.reset()
    counters.clear()
    # fallback_random: the compiled blocks draw stochastic depth from eager's generator, so the runs compare.
    with torch._inductor.config.patch(fallback_random=True):
        for model in (eager, compiled):
            torch.manual_seed(1)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            grads.append({n: p.grad for n, p in model.named_parameters()})
    # 4 blocks with drop rates 0, 0.067, 0.133, 0.2: one graph for rate 0 and one shared by the rest.
    assert counters["stats"]["unique_graphs"] == 2
    for name, g in grads[0].items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)
    # parallelize's order: checkpointing first, then compile over the checkpointed block; same gradients.
    both = copy.deepcopy(eager)
    both.zero_grad(set_to_none=True)
    apply_act_checkpoint(both)
    compile_blocks(both)
    assert list(both.state_dict()) == list(eager.state_dict())
    with torch._inductor.config.patch(fallback_random=True):
        torch.manual_seed(1)
        torch.nn.functional.cross_entropy(both(x), y).backward()
    for name, g in grads[0].items():
        torch.testing.assert_close(dict(both.named_parameters())[name].grad, g, rtol=1e-4, atol=1e-6, msg=name)


def test_deepspeed_is_imported_without_mlflow_which_stays_importable():
    # A fresh interpreter: in this one pytest's other modules have imported mlflow already.
    code = ("import sys; from pretrain.parallelize import import_deepspeed; import_deepspeed(); "
            "assert 'deepspeed' in sys.modules and 'mlflow' not in sys.modules, sorted(sys.modules); "
            "from deepspeed.autotuning import autotuner; assert not autotuner.has_mlflow; "
            "import mlflow; assert mlflow.MlflowClient; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
