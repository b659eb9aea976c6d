"""The one DeepSpeed-config builder (pretrain/ds_config.py): fine-tuning's batch arithmetic, what it
inherits from the user's raw keys, and the check of those keys against DeepSpeed's own parser."""
from __future__ import annotations

import pytest

from pipelines.config import ConfigError, load_config
from pretrain.ds_config import check_deepspeed_keys, engine_knobs, finetune_config
from pretrain.errors import InputError
from pretrain.transfer import FinetuneJob


def _job(**kw) -> FinetuneJob:
    base = dict(dataset="digits", data_root=None, export_dir="x", init="pretrained", lr=0.01, steps=100,
                warmup_steps=5, batch=512, img_size=384, precision="bf16", zero_stage=2)
    return FinetuneJob(**{**base, **kw})


def test_finetune_config_accumulates_to_the_papers_batch_on_any_world_size():
    ds = finetune_config(_job(micro_batch=32), world_size=8)
    batch = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    assert tuple(ds[k] for k in batch) == (512, 32, 2)
    one = finetune_config(_job(micro_batch=32), world_size=1)  # the same step on one device
    assert (one["train_micro_batch_size_per_gpu"], one["gradient_accumulation_steps"]) == (32, 16)
    whole = finetune_config(_job(), world_size=4)  # no micro-batch: each rank's share at once
    assert (whole["train_micro_batch_size_per_gpu"], whole["gradient_accumulation_steps"]) == (128, 1)
    assert "optimizer" not in ds and ds["zero_allow_untested_optimizer"]  # the protocol's SGD is passed in
    assert ds["scheduler"]["type"] == "WarmupCosineLR" and ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"] == {"stage": 2} and ds["bf16"]["enabled"]
    with pytest.raises(InputError, match=r"transfer.batch: 512 is not transfer.micro_batch x world size .*\(48 x 8"):
        finetune_config(_job(micro_batch=48), world_size=8)


def test_fine_tuning_inherits_the_engine_knobs_but_not_the_optimisation():
    raw = {"zero_optimization": {"stage": 3, "overlap_comm": True}, "train_micro_batch_size_per_gpu": 4,
           "gradient_clipping": 0.1, "optimizer": {"params": {"eps": 1e-6}}, "communication_data_type": "fp32"}
    knobs = engine_knobs(raw)
    assert knobs == {"zero_optimization": {"stage": 3, "overlap_comm": True}, "communication_data_type": "fp32"}
    ds = finetune_config(_job(micro_batch=64, deepspeed=knobs), world_size=8)
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert ds["train_micro_batch_size_per_gpu"] == 64 and ds["gradient_clipping"] == 1.0 and "optimizer" not in ds


@pytest.mark.parametrize("raw, message", [
    ({"zero_optimizaton": {"stage": 2}},
     "pretrain.deepspeed.zero_optimizaton: unknown DeepSpeed key (did you mean zero_optimization?)"),
    ({"zero_optimization": {"stage": 2, "overlap_comms": True}},
     "pretrain.deepspeed.zero_optimization.overlap_comms: unknown DeepSpeed key (did you mean overlap_comm?)"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu", "pin_memry": True}}},
     "pretrain.deepspeed.zero_optimization.offload_optimizer.pin_memry: unknown DeepSpeed key (did you mean pin_memory?)"),
    ({"flops_profiler": {"enabeld": True}},  # a section DeepSpeed reads key by key, not through pydantic
     "pretrain.deepspeed.flops_profiler.enabeld: unknown DeepSpeed key (did you mean enabled?)"),
    ({"tensorboard": {"enabeld": True}},  # a pydantic model built from the top level
     "pretrain.deepspeed.tensorboard.enabeld: unknown DeepSpeed key (did you mean enabled?)"),
    ({"zero_optimization": {"stage": "two"}}, "pretrain.deepspeed.zero_optimization.stage: "),
])
def test_unknown_or_bad_deepspeed_keys_are_named_with_a_suggestion(raw, message):
    with pytest.raises(ConfigError) as e:
        check_deepspeed_keys(raw)
    assert str(e.value).startswith(message), str(e.value)


def test_known_deepspeed_keys_pass_and_validate_checks_them():
    check_deepspeed_keys({"zero_optimization": {"stage": 3, "overlap_comm": True, "reduce_bucket_size": 5e7},
                          "bf16": {"enabled": True}, "optimizer": {"params": {"eps": 1e-6}},
                          "activation_checkpointing": {"partition_activations": True},
                          "wall_clock_breakdown": True, "checkpoint": {"load_universal": True}})
    with pytest.raises(ConfigError, match=r"pretrain.deepspeed.gradient_clippin: unknown DeepSpeed key \(did you mean "
                                          r"gradient_clipping\?\)"):
        load_config("local", ["pretrain.deepspeed={gradient_clippin: 0.5}"])
    assert load_config("local", ["transfer.workers=2", "transfer.micro_batch=16"]).transfer.grad_accum == 2
    with pytest.raises(ConfigError, match=r"transfer.batch: 64 is not transfer.micro_batch x transfer.workers"):
        load_config("local", ["transfer.workers=2", "transfer.micro_batch=24"])
