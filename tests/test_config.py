"""The config schema: presets, typed --set overrides, and every way a config can be wrong.

Each error must be a ConfigError (an InputError: the CLI exits 2) whose message names the key path
or the file.
"""
from __future__ import annotations

import dataclasses

import pytest

from pipelines.config import (
    Config,
    ConfigError,
    from_dict,
    list_presets,
    load_config,
    parse_override,
    preset_path,
    replace,
    to_dict,
    flatten,
)
from pretrain.errors import InputError

PRESETS = ["local", "vit_b16_i21k", "vit_l16_jft", "vit_h14_jft"]


def _bad(*overrides: str) -> str:
    """The message of the ConfigError that ``local`` plus ``overrides`` raises."""
    with pytest.raises(ConfigError) as e:
        load_config("local", list(overrides))
    return str(e.value)


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_round_trip(name):
    cfg = load_config(name)
    assert isinstance(cfg, Config) and cfg.name == name
    assert from_dict(to_dict(cfg)) == cfg
    header = preset_path(name).read_text().splitlines()[0]
    assert header.startswith(f"# {name}:")
    assert "pretrain.lr" in flatten(cfg) and "pretrain.augment.flip" in flatten(cfg)


def test_preset_list_and_default():
    assert set(PRESETS) <= set(list_presets())
    assert load_config(None) == load_config("local")
    assert load_config(preset_path("local")) == load_config("local")


# (variant, lr, weight decay, dropout): the paper's Table 3
TABLE3 = {
    "vit_b16_i21k": ("B/16", 1e-3, 0.03, 0.1),
    "vit_l16_jft": ("L/16", 4e-4, 0.1, 0.0),
    "vit_h14_jft": ("H/14", 3e-4, 0.1, 0.0),
}


@pytest.mark.parametrize("name", sorted(TABLE3))
def test_paper_presets_have_table3_settings(name):
    variant, lr, wd, dropout = TABLE3[name]
    cfg = load_config(name)
    p = cfg.pretrain
    assert cfg.model.variant == variant and cfg.model.img_size == 224
    assert p.lr == pytest.approx(lr) and p.weight_decay == pytest.approx(wd)
    assert cfg.model.dropout == pytest.approx(dropout)
    assert p.betas == (0.9, 0.999)
    assert p.global_batch == 4096 and p.warmup_steps == 10_000 and p.schedule == "linear"
    assert p.global_batch == p.micro_batch * p.workers * p.grad_accum
    assert p.use_gpu


def test_local_preset_is_cpu_sized():
    cfg = load_config("local")
    assert not cfg.pretrain.use_gpu and cfg.ray.address is None
    assert cfg.pretrain.precision != "fp16"


# --------------------------------------------------------------------------- --set overrides


@pytest.mark.parametrize("item,key,value", [
    ("pretrain.lr=1e-3", "pretrain.lr", "1e-3"),   # YAML 1.1 leaves this a string; the schema makes it 0.001
    ("pretrain.lr=0.002", "pretrain.lr", 0.002),
    ("pretrain.steps=10", "pretrain.steps", 10),
    ("pretrain.use_gpu=true", "pretrain.use_gpu", True),
    ("pretrain.use_gpu=False", "pretrain.use_gpu", False),
    ("transfer.lrs=[0.1, 0.2]", "transfer.lrs", [0.1, 0.2]),
    ("transfer.steps=null", "transfer.steps", None),
    ("name=a=b", "name", "a=b"),
    (" name = x ", "name", "x"),
    ("workdir=", "workdir", ""),
])
def test_parse_override_values(item, key, value):
    assert parse_override(item) == (key, value)


def test_overrides_are_typed_in_the_config():
    cfg = load_config("local", [
        "pretrain.lr=1e-3", "pretrain.steps=10", "pretrain.use_gpu=false", "transfer.lrs=[0.1, 0.2]",
        "transfer.steps=null", "pretrain.betas=[0.8, 0.99]", "pretrain.augment.randaugment=[2, 15]",
        "pretrain.steps=3.0e+8", "pretrain.deepspeed={wall_clock_breakdown: true}", "seed=3",
    ])
    assert cfg.pretrain.lr == 0.001 and isinstance(cfg.pretrain.lr, float)
    assert cfg.pretrain.steps == 300_000_000 and isinstance(cfg.pretrain.steps, int)  # the last --set wins
    assert cfg.pretrain.use_gpu is False
    assert cfg.transfer.lrs == [0.1, 0.2] and cfg.transfer.steps is None
    assert cfg.pretrain.betas == (0.8, 0.99) and cfg.pretrain.augment.randaugment == (2, 15)
    assert cfg.pretrain.deepspeed == {"wall_clock_breakdown": True} and cfg.seed == 3


def test_replace_revalidates():
    cfg = load_config("local")
    new = replace(cfg, **{"pretrain.steps": 7, "model.pool": "gap"})
    assert new.pretrain.steps == 7 and new.model.pool == "gap" and cfg.pretrain.steps != 7
    with pytest.raises(ConfigError, match="pretrain.global_batch"):
        replace(cfg, **{"pretrain.micro_batch": 7})


def test_config_is_frozen():
    cfg = load_config("local")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.pretrain.lr = 1.0  # type: ignore[misc]


# --------------------------------------------------------------------------- error paths


@pytest.mark.parametrize("override,path", [
    ("bogus=1", "bogus: unknown key"),
    ("pretrain.bogus=1", "pretrain.bogus: unknown key"),
    ("pretrain.augment.bogus=1", "pretrain.augment.bogus: unknown key"),
    ("shard.download.bogus=1", "shard.download.bogus: unknown key"),
])
def test_unknown_keys_name_the_full_path(override, path):
    msg = _bad(override)
    assert path in msg and "allowed:" in msg and "local.yaml" in msg


@pytest.mark.parametrize("override,expected", [
    ("pretrain.stepz=3", "pretrain.stepz: unknown key, did you mean pretrain.steps?"),
    ("pretrain.augment.mixpu=0.2", "pretrain.augment.mixpu: unknown key, did you mean pretrain.augment.mixup?"),
    ("shard.download.timeout=3", "shard.download.timeout: unknown key, did you mean shard.download.timeout_s?"),
    ("modle.variant=B/16", "modle: unknown key, did you mean model?"),
])
def test_a_typo_gets_did_you_mean(override, expected):
    msg = _bad(override)
    assert expected in msg and "allowed:" not in msg  # the close key, not a list of all of them


def test_every_bad_key_and_value_is_reported_at_once():
    msg = _bad("pretrain.stepz=3", "model.pool=max", "pretrain.lr=fast", "bogus=1")
    assert msg.startswith("4 problems in ") and "local.yaml" in msg
    for part in ("pretrain.stepz: unknown key", "model.pool: 'max' is not one of", "pretrain.lr: expected a number",
                 "bogus: unknown key"):
        assert part in msg
    with pytest.raises(ConfigError) as e:
        load_config("local", ["pretrain.steps=0", "shard.quality=0", "transfer.workers=0", "model.variant=Q/16"])
    assert len(e.value.problems) == 4  # the cross-field checks too, each naming its key
    assert {p.split(":")[0] for p in e.value.problems} == {"pretrain.steps", "shard.quality", "transfer.workers",
                                                           "model.variant"}
    msg = _bad("--bad", "also bad")
    assert msg.startswith("2 problems") and "'--bad': expected key=value" in msg and "'also bad'" in msg


@pytest.mark.parametrize("override,expected", [
    ("pretrain.steps=ten", "pretrain.steps: expected an integer, got 'ten'"),
    ("pretrain.steps=2.5", "pretrain.steps: expected an integer"),
    ("pretrain.steps=true", "pretrain.steps: expected an integer"),
    ("pretrain.lr=fast", "pretrain.lr: expected a number"),
    ("pretrain.lr=true", "pretrain.lr: expected a number"),
    ("pretrain.use_gpu=1", "pretrain.use_gpu: expected true or false"),
    ("pretrain.use_gpu=yes please", "pretrain.use_gpu: expected true or false"),
    ("name=5", "name: expected a string"),
    ("transfer.lrs=0.1", "transfer.lrs: expected a list"),
    ("transfer.lrs=[0.1, x]", "transfer.lrs[1]: expected a number"),
    ("pretrain.betas=[0.9]", "pretrain.betas: expected 2 items, got 1"),
    ("pretrain.betas=[0.9, high]", "pretrain.betas[1]: expected a number"),
    ("pretrain.deepspeed=5", "pretrain.deepspeed: expected a mapping"),
    ("pretrain.augment=5", "pretrain.augment: expected a mapping"),
    ("pretrain.augment.randaugment=[2]", "pretrain.augment.randaugment"),
    ("transfer.steps=many", "transfer.steps: expected an integer"),
    ("name.sub=1", "name: is not a section"),
])
def test_wrong_types_name_the_key(override, expected):
    assert expected in _bad(override)


@pytest.mark.parametrize("override,expected", [
    ("pretrain.schedule=step", "pretrain.schedule: 'step' is not one of ['linear', 'cosine']"),
    ("pretrain.zero_stage=4", "pretrain.zero_stage: 4 is not one of [0, 1, 2, 3]"),
    ("pretrain.zero_stage=true", "pretrain.zero_stage: True is not one of"),
    ("pretrain.precision=fp8", "pretrain.precision: 'fp8' is not one of"),
    ("model.pool=max", "model.pool: 'max' is not one of ['cls', 'gap']"),
    ("transfer.mode=zero-shot", "transfer.mode"),
    ("shard.resize_mode=stretch", "shard.resize_mode"),
])
def test_bad_literals_name_the_key_and_choices(override, expected):
    assert expected in _bad(override)


def test_global_batch_must_be_micro_batch_times_workers_times_accumulation():
    msg = _bad("pretrain.global_batch=100", "pretrain.micro_batch=32", "pretrain.workers=2")
    assert "pretrain.global_batch: 100 is not micro_batch x workers" in msg and "32 x 2 = 64" in msg
    ok = load_config("local", ["pretrain.global_batch=192", "pretrain.micro_batch=32", "pretrain.workers=2"])
    assert ok.pretrain.grad_accum == 3


@pytest.mark.parametrize("override,expected", [
    ("seed=-1", "seed: must be >= 0"),
    ("shard.samples_per_shard=0", "shard.samples_per_shard: must be >= 1"),
    ("shard.samples_per_shard=2000000", "shard.samples_per_shard: at most 1000000"),
    ("shard.image_size=0", "shard.image_size"),
    ("shard.min_size=0", "shard.min_size"),
    ("shard.max_pixels=0", "shard.max_pixels"),
    ("shard.quality=0", "shard.quality: must be in 1..100"),
    ("shard.quality=101", "shard.quality: must be in 1..100"),
    ("shard.max_in_flight=0", "shard.max_in_flight"),
    ("shard.task_retries=-1", "shard.task_retries"),
    ("shard.download.threads=0", "shard.download.threads"),
    ("shard.download.retries=-1", "shard.download.retries"),
    ("shard.download.timeout_s=0", "shard.download.timeout_s: must be > 0"),
    ("shard.download.backoff_s=-1", "shard.download.backoff_s"),
    ("shard.builtin.classes=0", "shard.builtin.classes"),
    ("shard.builtin.images_per_class=0", "shard.builtin.images_per_class"),
    ("shard.builtin.image_size=4", "shard.builtin.image_size: must be >= 8"),
    ("model.img_size=0", "model.img_size"),
    ("model.img_size=30", "model.img_size: 30 is not a multiple of the patch size 4"),
    ("model.variant=B16", "model.variant"),
    ("model.variant=Q/16", "model.variant"),
    ("model.dropout=1.0", "model.dropout"),
    ("model.drop_path=-0.1", "model.drop_path"),
    ("pretrain.workers=0", "pretrain.workers: must be >= 1"),
    ("pretrain.micro_batch=0", "pretrain.micro_batch"),
    ("pretrain.global_batch=0", "pretrain.global_batch"),
    ("pretrain.steps=0", "pretrain.steps: must be >= 1"),
    ("pretrain.warmup_steps=-1", "pretrain.warmup_steps"),
    ("pretrain.loader_workers=-1", "pretrain.loader_workers"),
    ("pretrain.log_every=0", "pretrain.log_every"),
    ("pretrain.checkpoint_every=0", "pretrain.checkpoint_every"),
    ("pretrain.keep_checkpoints=0", "pretrain.keep_checkpoints"),
    ("pretrain.max_failures=-1", "pretrain.max_failures"),
    ("pretrain.shuffle_buffer=-1", "pretrain.shuffle_buffer"),
    ("pretrain.lr=0", "pretrain.lr: must be > 0"),
    ("pretrain.betas=[0.9, 1.0]", "pretrain.betas: each must be in [0, 1)"),
    ("pretrain.label_key=label", "pretrain.label_key: must be cls, txt or json:FIELD"),
    ("pretrain.label_key=json:", "pretrain.label_key"),
    ("pretrain.augment.crop_scale=[0.5, 0.2]", "pretrain.augment.crop_scale"),
    ("pretrain.augment.crop_scale=[0, 1]", "pretrain.augment.crop_scale"),
    ("pretrain.augment.std=[0.5, 0, 0.5]", "pretrain.augment.std"),
    ("pretrain.precision=fp16", "pretrain.precision: fp16 needs pretrain.use_gpu"),
    ("pretrain.fewshot.every=0", "pretrain.fewshot.every"),
    ("transfer.img_size=30", "transfer.img_size: 30 is not a multiple of the patch size 4"),
    ("transfer.batch=0", "transfer.batch"),
    ("transfer.workers=0", "transfer.workers"),
    ("transfer.datasets=[]", "transfer.datasets: at least one dataset"),
    ("transfer.lrs=[]", "transfer.lrs"),
    ("transfer.lrs=[0.1, -0.1]", "transfer.lrs"),
    ("transfer.steps=0", "transfer.steps: must be >= 1"),
])
def test_value_checks_name_the_key(override, expected):
    assert expected in _bad(override)


def test_compiled_blocks_are_refused_under_zero3():
    assert "model.compile: not with pretrain.zero_stage 3" in _bad("model.compile=true", "pretrain.zero_stage=3")
    load_config("local", ["model.compile=true", "pretrain.zero_stage=2"])  # stages 0 to 2 are fine


@pytest.mark.parametrize("item,expected", [
    ("pretrain.steps", "expected key=value"),
    ("=5", "empty key"),
    ("pretrain.lrs=[1, 2", "cannot parse"),
])
def test_malformed_set_items(item, expected):
    assert expected in _bad(item)


def test_missing_file_and_unknown_preset(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"{missing}: config file not found"):
        load_config(missing)
    with pytest.raises(ConfigError, match="preset 'nope' does not exist \\(known: .*local"):
        load_config("nope")


@pytest.mark.parametrize("text,expected", [
    ("model: {variant: B/16\n", "not valid YAML"),
    ("- 1\n- 2\n", "the top level must be a mapping"),
    ("model: [1, 2]\n", "model: expected a mapping"),
    ("pretrain:\n  stepz: 3\n", "pretrain.stepz: unknown key"),
])
def test_bad_files_name_the_file(tmp_path, text, expected):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert expected in str(e.value) and str(path) in str(e.value)


def test_empty_file_is_the_defaults_and_errors_are_input_errors(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == Config()
    assert issubclass(ConfigError, InputError) and issubclass(InputError, ValueError)
