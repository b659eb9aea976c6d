"""The core's typed config: the slices the ML core reads (model, augment, few-shot, pretrain, transfer),
and the small schema machinery that builds any of these frozen dataclasses from YAML-shaped dicts.

``pipelines/config.py`` composes these slices with the orchestration ones (Ray, MLflow, sharding) into
the one ``Config`` users write; the core never sees that whole bag. ``pretrain.launch`` builds the
same slices from a resolved config file, so a torchrun job and a Ray Train job are typed alike.
Errors are ``ConfigError`` and name the full key path (``pretrain.micro_batch``) or the file.
"""
from __future__ import annotations

import dataclasses
import re
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from pretrain.errors import InputError


class ConfigError(InputError):
    """A bad config file, key or value. The message names the file or the key path.

    ``ConfigError(*problems)``: one or several problems, each a line naming its key, so that a config
    with three mistakes costs one run to fix, not three. ``problems`` keeps them apart."""

    def __init__(self, *problems: str, where: Optional[str] = None):
        self.problems = [str(p) for p in problems] or ["bad config"]
        if len(self.problems) == 1:
            super().__init__(self.problems[0] + (f" (in {where})" if where else ""))
        else:
            head = f"{len(self.problems)} problems" + (f" in {where}" if where else "")
            super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in self.problems))


# --------------------------------------------------------------------------- the core's slices

# The paper's sizes (and debug ones) as a table, here rather than in model.py so that checking a config
# (every stage's driver does) does not import torch.
# The paper's Table 1 (Ti and S from DeiT, g from Zhai et al. "Scaling Vision Transformers").
VARIANTS: dict[str, dict[str, int]] = {
    "Ti": dict(width=192, depth=12, mlp=768, heads=3),
    "S": dict(width=384, depth=12, mlp=1536, heads=6),
    "M": dict(width=512, depth=12, mlp=2048, heads=8),
    "B": dict(width=768, depth=12, mlp=3072, heads=12),
    "L": dict(width=1024, depth=24, mlp=4096, heads=16),
    "H": dict(width=1280, depth=32, mlp=5120, heads=16),
    "g": dict(width=1408, depth=40, mlp=6144, heads=16),
    # Debug sizes for CPU tests and the laptop preset: same code path, small numbers.
    "mu": dict(width=48, depth=2, mlp=96, heads=3),
    "tiny": dict(width=96, depth=4, mlp=384, heads=3),
}


def parse_variant(variant: str) -> tuple[str, int]:
    """``"B/16"`` -> ``("B", 16)``. The patch size is part of the name, as in the paper."""
    m = re.fullmatch(r"([A-Za-z]+)/(\d+)", variant.strip())
    if not m or m.group(1) not in VARIANTS:
        raise ValueError(f"{variant!r} is not NAME/PATCH with NAME in {', '.join(VARIANTS)} (e.g. 'B/16')")
    return m.group(1), int(m.group(2))




@dataclass(frozen=True)
class ModelConfig:
    variant: str = "B/16"
    img_size: int = 224
    pool: Literal["cls", "gap"] = "cls"
    representation_size: Optional[int] = None
    dropout: float = 0.0
    drop_path: float = 0.0
    act_checkpoint: bool = False
    compile: bool = False  # torch.compile each transformer block for pretraining (one graph, reused by all)


@dataclass(frozen=True)
class AugmentConfig:
    crop: Literal["inception", "center"] = "inception"
    flip: bool = True
    crop_scale: tuple[float, float] = (0.08, 1.0)  # Inception crop area range (big_vision default)
    randaugment: Optional[tuple[int, int]] = None  # (num_ops, magnitude), e.g. [2, 15]
    mixup: float = 0.0  # Beta(alpha, alpha); 0 = off
    cutmix: float = 0.0
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # the paper's [-1, 1] scaling
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class FewshotConfig:
    datasets: list[str] = field(default_factory=list)
    shots: list[int] = field(default_factory=lambda: [5, 10])
    every: int = 5000


@dataclass(frozen=True)
class PretrainConfig:
    shards: Optional[str] = None  # None = {workdir}/shards
    label_key: str = "cls"  # cls | json:FIELD | txt
    num_classes: Optional[int] = None  # None = the label count in the shards' manifest
    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    global_batch: int = 4096
    micro_batch: int = 64
    steps: int = 100000
    lr: float = 8.0e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.1
    warmup_steps: int = 10000
    schedule: Literal["linear", "cosine"] = "linear"
    grad_clip: float = 1.0
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    zero_stage: Literal[0, 1, 2, 3] = 2
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: Literal["softmax", "sigmoid"] = "softmax"  # sigmoid: multi-label (JFT), head bias starts at -10
    label_smoothing: float = 0.0
    eval_every: int = 1000  # steps between passes over the shards' held-out validation part (shard.holdout)
    shuffle_buffer: int = 2000
    loader_workers: int = 4
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    max_failures: int = 3
    peak_tflops: Optional[float] = None
    fewshot: FewshotConfig = field(default_factory=FewshotConfig)
    deepspeed: dict = field(default_factory=dict)

    @property
    def grad_accum(self) -> int:
        return self.global_batch // (self.micro_batch * self.workers)


@dataclass(frozen=True)
class TransferConfig:
    checkpoint: str = "latest"
    datasets: list[str] = field(default_factory=lambda: ["cifar10"])
    mode: Literal["finetune", "linear", "fewshot"] = "finetune"
    img_size: int = 384
    batch: int = 512
    lrs: list[float] = field(default_factory=lambda: [0.001, 0.003, 0.01, 0.03])
    steps: Optional[int] = None
    warmup_steps: Optional[int] = None  # None = 5 % of the steps
    shots: list[int] = field(default_factory=lambda: [1, 5, 10, 25])
    compare_scratch: bool = False  # also fine-tune a randomly initialised model with the same budget
    data_root: Optional[str] = None
    workers: int = 1  # Ray Train workers per grid cell (DeepSpeed data parallel, ZeRO as pretrain.zero_stage)
    micro_batch: Optional[int] = None  # per worker and step; None = batch / workers (no accumulation)

    @property
    def grad_accum(self) -> int:
        """Micro-batches per worker per step: the paper's batch is one optimisation whatever fits per device."""
        return 1 if self.micro_batch is None else self.batch // (self.micro_batch * self.workers)


def check_label_key(label_key: str, where: str = "pretrain.label_key") -> None:
    """Where a sample's label is: the ``.cls`` or ``.txt`` member, or a field of its ``.json``."""
    if not (label_key in ("cls", "txt") or (label_key.startswith("json:") and len(label_key) > 5)):
        raise ConfigError(f"{where}: must be cls, txt or json:FIELD, got {label_key!r}")


@dataclass(frozen=True)
class TrainJob:
    """What one pretraining process needs: the hand-off from any launcher (Ray Train, torchrun) to the core."""

    model: ModelConfig
    pretrain: PretrainConfig
    workdir: str  # absolute path or URL: workers may run on other machines
    seed: int = 0
    data_root: Optional[str] = None  # downstream data for the few-shot probe


# --------------------------------------------------------------------------- building from dicts


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in the typed form."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors: list[ConfigError] = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{path}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise ConfigError(f"{path}: {value!r} is not one of {list(args)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return build(tp, value, path)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):  # YAML 1.1 reads "300e6" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)  # 300e6 style counts
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    raise ConfigError(f"{path}: unsupported type {_type_name(tp)}")


def did_you_mean(word: str, choices: "typing.Iterable[str]") -> Optional[str]:
    """The choice closest to ``word`` (a typo, a prefix), or None when none is close."""
    choices = sorted(choices)
    prefixed = [c for c in choices if c.startswith(word) or word.startswith(c)]
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return close[0] if close else (prefixed[0] if len(prefixed) == 1 else None)


def build(cls: type, data: dict, prefix: str = "") -> Any:
    """``cls(**data)`` with every value checked against its annotation; nested dataclasses built
    from nested dicts. Every unknown key and wrong type is reported, in one ``ConfigError``."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    problems: list[str] = []
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            guess = did_you_mean(str(key), names)
            full = f"{prefix}.{guess}" if prefix else guess
            problems.append(f"{where}: unknown key, did you mean {full}?" if guess
                            else f"{where}: unknown key (allowed: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            path = f"{prefix}.{f.name}" if prefix else f.name
            try:
                kwargs[f.name] = _coerce(data[f.name], hints[f.name], path)
            except ConfigError as e:
                problems += e.problems
    if problems:
        raise ConfigError(*problems)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """The config as plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
