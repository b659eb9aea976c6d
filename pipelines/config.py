"""The user's config: the core's typed slices (``pretrain/config.py``) composed with the orchestration
ones (Ray, MLflow, sharding), loaded from YAML or a preset, ``--set`` overrides applied, validated once
at the edge. The ML core is handed only its typed slices (``TrainJob``, ``FinetuneJob``, ``ModelConfig``...),
never this whole bag; a stage's driver (``run_shard_stage``, ``run_pretrain``, ``run_transfer``) takes the
``Config``, because it logs the whole config to its MLflow run and needs the workdir, Ray and MLflow
settings beside its own slice. Errors are ``ConfigError`` and name the full key path
(``pretrain.micro_batch``) or the file, so the CLI can exit 2.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import yaml

from pretrain.config import (AugmentConfig, ConfigError, FewshotConfig, ModelConfig, PretrainConfig,
                             TrainJob, TransferConfig, VARIANTS, build, check_label_key, did_you_mean,
                             parse_variant, to_dict)
from pretrain.redact import redact

PRESET_DIR = Path(__file__).parent / "presets"
__all__ = ["AugmentConfig", "Config", "ConfigError", "FewshotConfig", "ModelConfig", "PretrainConfig",
           "TrainJob", "TransferConfig", "load_config", "to_dict"]


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class RayConfig:
    address: Optional[str] = None  # None = start local Ray in-process; "auto" / ray://host:10001 = join


@dataclass(frozen=True)
class TrackingConfig:
    uri: Optional[str] = None  # None = sqlite file in the workdir
    experiment: str = "vitscale"


@dataclass(frozen=True)
class DownloadConfig:
    timeout_s: float = 10.0
    retries: int = 2
    threads: int = 16
    # Connections to one host at a time, per task (a node runs a task per core): a crawler's politeness.
    # A list over many hosts still keeps every thread busy. 2, not 4: small servers keep a short accept
    # queue (python -m http.server: 5), and a connection it drops waits out the kernel's 1 s SYN resend,
    # at a shard's end with the whole task waiting on it. 0: no limit.
    per_host: int = 2
    backoff_s: float = 0.5  # first retry waits this long, then doubles
    respect_noai: bool = True  # honour X-Robots-Tag: noai / noimageai
    # Schemes read through fsspec; http(s), file:// and plain paths are always read, with their own limits.
    # A `::` chain needs every link listed. Object storage by default: the built-in source and an index on
    # a bucket list their images beside it (s3://...), and the store is the one the stages write to.
    allowed_schemes: tuple[str, ...] = ("s3", "s3a", "gs", "gcs", "az", "abfs")
    allow_private: bool = False  # fetch from loopback, private and link-local addresses, redirects included


@dataclass(frozen=True)
class BuiltinSourceConfig:
    """Settings of the formula-driven ``builtin:fractal`` source (FractalDB-style IFS classes)."""

    classes: int = 10
    images_per_class: int = 40
    image_size: int = 64


@dataclass(frozen=True)
class ShardConfig:
    source: str = "builtin:fractal"
    path_column: str = "path"
    label_column: str = "label"
    samples_per_shard: int = 10000
    image_size: int = 256
    resize_mode: Literal["keep_ratio", "center_crop", "none"] = "keep_ratio"
    quality: int = 95
    min_size: int = 16
    max_pixels: int = 89478485
    max_decoded_mb: int = 256  # one image's decoded pixels (width x height x bands x bytes per band), in MiB
    max_in_flight: Optional[int] = None  # shard tasks in flight; None = 2 x cluster CPUs
    task_retries: int = 3  # Ray retries of a shard task whose worker died (the shard is redone whole)
    shuffle: bool = True  # write the rows in a seeded random order (pipelines/shuffle.py): i.i.d.-like shards
    holdout: float = 0  # held-out validation rows: a fraction if below 1, a count if 1 or more
    download: DownloadConfig = field(default_factory=DownloadConfig)
    builtin: BuiltinSourceConfig = field(default_factory=BuiltinSourceConfig)


@dataclass(frozen=True)
class Config:
    name: str = "demo"
    workdir: str = "runs/demo"
    seed: int = 0
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)


# --------------------------------------------------------------------------- building from dicts


def leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"pretrain.lr": 0.0008, ...}``: every value of a config (or a nested dict) by dotted key,
    as it is: ``--set KEY=...`` can set each of them back."""
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(leaves(v, key + "."))
        else:
            out[key] = v
    return out


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """The config as MLflow params: ``leaves`` with credentials stripped from every URI (params are
    readable by anyone who can read the experiment)."""
    return {k: redact(v) for k, v in leaves(obj, prefix).items()}


def from_dict(data: dict, source: str = "config") -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    cfg = build(Config, data)
    validate(cfg)
    return cfg


def replace(cfg: Config, **overrides: Any) -> Config:
    """A copy with dotted-key overrides, re-validated: ``replace(cfg, **{"pretrain.steps": 10})``."""
    data = to_dict(cfg)
    for key, value in overrides.items():
        _set_path(data, key, value)
    return from_dict(data)


# --------------------------------------------------------------------------- validation

PLACEHOLDER_BUCKET = "CHANGE-ME"  # the cluster presets' workdir until the user names a bucket


def check_workdir(cfg: Config) -> None:
    """Before a stage writes anything: the workdir is a real location, not the presets' placeholder.
    (Printing a preset or planning with one needs no bucket, so this is not part of ``validate``.)"""
    if PLACEHOLDER_BUCKET in cfg.workdir:
        raise ConfigError(f"workdir: {cfg.workdir!r} still names the placeholder bucket {PLACEHOLDER_BUCKET}; "
                          f"set yours, e.g. --set workdir=s3://my-bucket/{cfg.name} (credentials and endpoint "
                          "come from AWS_* / AWS_ENDPOINT_URL, never from the config)")


def _check_schemes(cfg: Config, bad: Callable[[str], None]) -> None:
    """Allowed schemes are fsspec's, and the built-in source reads its images back from the workdir."""
    allowed = cfg.shard.download.allowed_schemes
    for scheme in allowed:
        if scheme in ("http", "https", "file") or not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
            bad(f"shard.download.allowed_schemes: {scheme!r} is not an fsspec scheme to allow "
                "(lowercase, without '://'; http, https, file and plain paths are always read)")
    workdir_scheme = cfg.workdir.split("://", 1)[0].lower() if "://" in cfg.workdir else "file"
    if cfg.shard.source.startswith("builtin:") and workdir_scheme not in (*allowed, "file"):
        bad(f"shard.download.allowed_schemes: the built-in source's images are stored under the "
            f"workdir ({cfg.workdir}); add {workdir_scheme!r} to read them back")


def validate(cfg: Config) -> None:
    """Cross-field checks that a type alone cannot express. Every failing check is reported, in one
    ``ConfigError`` (a check that needs an earlier one to hold is skipped while that one fails)."""
    problems: list[str] = []
    bad = problems.append
    p, m, s, t = cfg.pretrain, cfg.model, cfg.shard, cfg.transfer
    positive = {
        "seed": (cfg.seed, 0),
        "shard.samples_per_shard": (s.samples_per_shard, 1),
        "shard.image_size": (s.image_size, 1),
        "shard.min_size": (s.min_size, 1),
        "shard.max_pixels": (s.max_pixels, 1),
        "shard.max_decoded_mb": (s.max_decoded_mb, 1),
        "shard.download.threads": (s.download.threads, 1),
        "shard.download.retries": (s.download.retries, 0),
        "shard.download.per_host": (s.download.per_host, 0),
        "shard.task_retries": (s.task_retries, 0),
        "shard.builtin.classes": (s.builtin.classes, 1),
        "shard.builtin.images_per_class": (s.builtin.images_per_class, 1),
        "shard.builtin.image_size": (s.builtin.image_size, 8),
        "model.img_size": (m.img_size, 1),
        "pretrain.workers": (p.workers, 1),
        "pretrain.micro_batch": (p.micro_batch, 1),
        "pretrain.global_batch": (p.global_batch, 1),
        "pretrain.steps": (p.steps, 1),
        "pretrain.warmup_steps": (p.warmup_steps, 0),
        "pretrain.loader_workers": (p.loader_workers, 0),
        "pretrain.log_every": (p.log_every, 1),
        "pretrain.eval_every": (p.eval_every, 1),
        "pretrain.checkpoint_every": (p.checkpoint_every, 1),
        "pretrain.keep_checkpoints": (p.keep_checkpoints, 1),
        "pretrain.max_failures": (p.max_failures, 0),
        "pretrain.shuffle_buffer": (p.shuffle_buffer, 0),
        "transfer.img_size": (t.img_size, 1),
        "transfer.batch": (t.batch, 1),
        "transfer.workers": (t.workers, 1),
    }
    for key, (value, low) in positive.items():
        if value < low:
            bad(f"{key}: must be >= {low}, got {value}")
    if not 1 <= s.quality <= 100:
        bad(f"shard.quality: must be in 1..100, got {s.quality}")
    if s.samples_per_shard > 1_000_000:  # keys are SSSSSS_IIIIII
        bad(f"shard.samples_per_shard: at most 1000000 (6-digit sample keys), got {s.samples_per_shard}")
    if not 0 <= p.label_smoothing < 1:
        bad(f"pretrain.label_smoothing: must be in [0, 1), got {p.label_smoothing}")
    if s.holdout < 0 or (s.holdout >= 1 and not float(s.holdout).is_integer()):
        bad(f"shard.holdout: a fraction in [0, 1) or a whole number of rows, got {s.holdout}")
    if s.max_in_flight is not None and s.max_in_flight < 1:
        bad(f"shard.max_in_flight: must be >= 1 or null, got {s.max_in_flight}")
    if s.download.backoff_s < 0:
        bad(f"shard.download.backoff_s: must be >= 0, got {s.download.backoff_s}")
    if s.download.timeout_s <= 0:
        bad(f"shard.download.timeout_s: must be > 0, got {s.download.timeout_s}")
    _check_schemes(cfg, bad)
    if p.micro_batch >= 1 and p.workers >= 1 and p.global_batch % (p.micro_batch * p.workers):
        bad(f"pretrain.global_batch: {p.global_batch} is not micro_batch x workers x an integer "
            f"accumulation ({p.micro_batch} x {p.workers} = {p.micro_batch * p.workers})")
    if p.lr <= 0:
        bad(f"pretrain.lr: must be > 0, got {p.lr}")
    if not all(0 <= b < 1 for b in p.betas):
        bad(f"pretrain.betas: each must be in [0, 1), got {list(p.betas)}")
    try:
        check_label_key(p.label_key)
    except ConfigError as e:
        bad(str(e))
    lo, hi = p.augment.crop_scale
    if not 0 < lo <= hi <= 1:
        bad(f"pretrain.augment.crop_scale: need 0 < low <= high <= 1, got {[lo, hi]}")
    if any(x <= 0 for x in p.augment.std):
        bad(f"pretrain.augment.std: must be > 0, got {list(p.augment.std)}")
    if p.precision == "fp16" and not p.use_gpu:
        bad("pretrain.precision: fp16 needs pretrain.use_gpu: true (use bf16 or fp32 on the CPU)")
    if m.compile and p.zero_stage == 3:
        bad("model.compile: not with pretrain.zero_stage 3, whose parameter hooks break the compiled "
            "blocks into pieces (use zero_stage 0 to 2, or model.compile: false)")
    if not 0 <= m.dropout < 1 or not 0 <= m.drop_path < 1:
        bad(f"model.dropout / model.drop_path: must be in [0, 1), got {m.dropout} / {m.drop_path}")

    try:
        name, patch = parse_variant(m.variant)
        assert name in VARIANTS
    except ValueError as e:
        bad(f"model.variant: {e}")
        patch = None
    if patch and m.img_size % patch:
        bad(f"model.img_size: {m.img_size} is not a multiple of the patch size {patch}")
    if patch and t.img_size % patch:
        bad(f"transfer.img_size: {t.img_size} is not a multiple of the patch size {patch}")
    if not t.datasets:
        bad("transfer.datasets: at least one dataset is needed")
    if not t.lrs or any(lr <= 0 for lr in t.lrs):
        bad(f"transfer.lrs: need one or more positive learning rates, got {t.lrs}")
    if t.steps is not None and t.steps < 1:
        bad(f"transfer.steps: must be >= 1, got {t.steps}")
    if t.warmup_steps is not None and t.warmup_steps < 0:
        bad(f"transfer.warmup_steps: must be >= 0, got {t.warmup_steps}")
    if any(k < 1 for k in t.shots):
        bad(f"transfer.shots: each must be >= 1, got {t.shots}")
    if t.micro_batch is not None and t.micro_batch < 1:
        bad(f"transfer.micro_batch: must be >= 1 or null, got {t.micro_batch}")
    elif t.micro_batch is None and t.workers >= 1 and t.batch % t.workers:
        bad(f"transfer.batch: {t.batch} is not divisible by transfer.workers ({t.workers})")
    elif t.micro_batch is not None and t.workers >= 1 and t.batch % (t.micro_batch * t.workers):
        bad(f"transfer.batch: {t.batch} is not transfer.micro_batch x transfer.workers x an integer accumulation "
            f"({t.micro_batch} x {t.workers} = {t.micro_batch * t.workers})")
    if p.deepspeed:  # DeepSpeed's own parser: imported (about 2 s) only when there are raw keys to check
        from pretrain.ds_config import check_deepspeed_keys  # noqa: PLC0415

        try:
            check_deepspeed_keys(p.deepspeed)
        except ConfigError as e:
            bad(str(e))
    if not p.fewshot.every >= 1:
        bad(f"pretrain.fewshot.every: must be >= 1, got {p.fewshot.every}")
    if problems:
        raise ConfigError(*problems)


# --------------------------------------------------------------------------- files and overrides


def _set_path(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is not a section, cannot set {key}")
        node = nxt
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``"pretrain.lr=1e-3"`` -> ``("pretrain.lr", 0.001)``; values are YAML (numbers, bools, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse {raw!r}: {e}") from None
    return key, value


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        known = list_presets()
        guess = did_you_mean(name, known)
        hint = f"did you mean {guess!r}? " if guess else ""
        raise ConfigError(f"preset {name!r} does not exist ({hint}known: {', '.join(known)})")
    return path


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def load_config(source: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a config file or a preset name (None = the ``local`` preset) and apply ``--set`` overrides."""
    if source is None:
        path = preset_path("local")
    elif Path(source).is_file() or str(source).endswith((".yaml", ".yml")):
        path = Path(source)
    else:
        path = preset_path(str(source))
    data = read_yaml(path)
    problems: list[str] = []
    for item in overrides:
        try:
            key, value = parse_override(item)
            _set_path(data, key, value)
        except ConfigError as e:
            problems += e.problems
    try:
        if problems:
            raise ConfigError(*problems)
        return from_dict(data, str(path))
    except ConfigError as e:
        raise ConfigError(*e.problems, where=str(path)) from None
