"""The DeepSpeed config, built in one place for pretraining and transfer, and the check of the user's
raw ``pretrain.deepspeed`` keys against DeepSpeed's own parser.

Both stages describe one optimisation the same way: a global batch, a micro-batch per rank, and the
accumulation that makes them meet on the world size actually running (``accumulation``); then the
precision, the ZeRO stage, gradient clipping and a warmup schedule. Pretraining adds DeepSpeed's AdamW;
fine-tuning hands DeepSpeed the protocol's SGD as a client optimizer. The user's raw keys go over the
result last, so any DeepSpeed knob can be reached without a new field here.
"""
from __future__ import annotations

import copy
import functools
import typing
from typing import TYPE_CHECKING, Optional

from pretrain.config import ConfigError, PretrainConfig, did_you_mean

if TYPE_CHECKING:  # transfer.py imports this module
    from pretrain.transfer import FinetuneJob
from pretrain.errors import InputError

# What defines the optimisation rather than how the engine runs it. Fine-tuning follows the paper's
# protocol, so it takes the user's raw keys minus these (ZeRO knobs, communication, ... still apply).
OPTIMISATION_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                     "optimizer", "scheduler", "gradient_clipping")


def accumulation(batch: int, micro_batch: int, world_size: int, batch_key: str, micro_key: str) -> int:
    """Micro-batches per rank per step: ``batch / (micro_batch x world_size)``, which must be whole. The
    world size is the one actually running, so another launcher (torchrun) gets the same batch."""
    per_step = micro_batch * world_size
    if micro_batch < 1 or batch % per_step:
        raise InputError(f"{batch_key}: {batch} is not {micro_key} x world size x an integer accumulation "
                         f"({micro_batch} x {world_size} = {per_step})")
    return batch // per_step


def merge(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``, recursing into mappings (the user's raw DeepSpeed keys win)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def warmup_schedule(kind: str, steps: int, warmup: int, lr: float) -> dict:
    """Linear warmup, then cosine or linear decay to 0 (DeepSpeed's schedulers need a warmup of >= 1)."""
    warmup = max(1, warmup)
    if kind == "cosine":  # WarmupCosineLR scales the optimizer's own LR
        return {"type": "WarmupCosineLR", "params": {
            "total_num_steps": steps, "warmup_num_steps": warmup, "warmup_min_ratio": 0.0,
            "cos_min_ratio": 0.0, "warmup_type": "linear"}}
    return {"type": "WarmupDecayLR", "params": {
        "total_num_steps": steps, "warmup_num_steps": warmup, "warmup_min_lr": 0.0,
        "warmup_max_lr": lr, "warmup_type": "linear"}}


def engine_config(*, batch: int, micro_batch: int, accum: int, precision: str, zero_stage: int, grad_clip: float,
                  scheduler: dict, optimizer: Optional[dict] = None, raw: Optional[dict] = None) -> dict:
    """The DeepSpeed JSON both stages share; ``optimizer`` None = a client optimizer is passed to
    ``deepspeed.initialize``; ``raw`` (the user's keys) is merged last."""
    cfg = {
        "train_batch_size": batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": grad_clip,
        "scheduler": scheduler,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": {"stage": zero_stage},
        "steps_per_print": 10**9,  # our loops log; keep DeepSpeed's own step prints quiet
        "wall_clock_breakdown": False,
    }
    if optimizer is None:
        cfg["zero_allow_untested_optimizer"] = True  # torch's SGD: ZeRO partitions its momentum like any state
    else:
        cfg["optimizer"] = optimizer
    return merge(cfg, dict(raw or {}))


# --------------------------------------------------------------------------- the two stages


def grad_accum_steps(train_cfg: PretrainConfig, world_size: int) -> int:
    """Pretraining's accumulation: ``global_batch / (micro_batch x world size)``."""
    return accumulation(train_cfg.global_batch, train_cfg.micro_batch, world_size, "pretrain.global_batch",
                        "micro_batch")


def deepspeed_config(train_cfg: PretrainConfig, world_size: int) -> dict:
    """Pretraining's config from the ``pretrain`` slice."""
    # torch's AdamW (fused on GPUs) instead of DeepSpeed's FusedAdam: no JIT-compiled extension to build.
    adam = {"lr": train_cfg.lr, "betas": list(train_cfg.betas), "eps": 1e-8, "weight_decay": train_cfg.weight_decay,
            "torch_adam": True}
    if train_cfg.use_gpu:
        adam["fused"] = True
    return engine_config(
        batch=train_cfg.global_batch, micro_batch=train_cfg.micro_batch,
        accum=grad_accum_steps(train_cfg, world_size),
        precision=train_cfg.precision, zero_stage=train_cfg.zero_stage, grad_clip=train_cfg.grad_clip,
        scheduler=warmup_schedule(train_cfg.schedule, train_cfg.steps, train_cfg.warmup_steps, train_cfg.lr),
        optimizer={"type": "AdamW", "params": adam}, raw=train_cfg.deepspeed)


def engine_knobs(raw: Optional[dict]) -> dict:
    """The user's raw keys that fine-tuning inherits from pretraining: all but the optimisation's."""
    return {k: copy.deepcopy(v) for k, v in (raw or {}).items() if k not in OPTIMISATION_KEYS}


def finetune_micro_batch(batch: int, micro_batch: Optional[int], world_size: int) -> int:
    """Images per rank per forward pass: the configured one, or the whole per-rank share (no accumulation)."""
    if micro_batch is not None:
        return micro_batch
    if batch % world_size:
        raise InputError(f"transfer.batch: {batch} is not divisible by the {world_size} workers")
    return batch // world_size


def finetune_config(job: "FinetuneJob", world_size: int) -> dict:
    """Fine-tuning's config from a ``FinetuneJob``: the protocol's batch, clipping and warmup-cosine
    schedule around a client SGD; ``job.deepspeed`` holds the inherited engine knobs."""
    micro = finetune_micro_batch(job.batch, job.micro_batch, world_size)
    return engine_config(
        batch=job.batch, micro_batch=micro,
        accum=accumulation(job.batch, micro, world_size, "transfer.batch", "transfer.micro_batch"),
        precision=job.precision, zero_stage=job.zero_stage, grad_clip=job.grad_clip,
        scheduler=warmup_schedule("cosine", job.steps, job.warmup_steps, job.lr), raw=job.deepspeed)


# --------------------------------------------------------------------------- checking the user's keys


class _Reads(dict):
    """A mapping that remembers which keys DeepSpeed's parser asked it for (``get``, ``[]``, ``in``)."""

    def __init__(self, data: dict):
        super().__init__(data)
        self.asked: set = set()

    def get(self, key, default=None):
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.asked.add(key)
        return super().__contains__(key)

    def keys(self):  # DeepSpeed also asks ``KEY in param_dict.keys()``
        return _AskedKeys(self)


class _AskedKeys:
    def __init__(self, owner: _Reads):
        self.owner = owner

    def __contains__(self, key):
        return key in self.owner

    def __iter__(self):
        return iter(dict.keys(self.owner))

    def __len__(self):
        return len(self.owner)


def _parse(raw: dict) -> tuple[_Reads, Optional[Exception]]:
    """Run DeepSpeed's config parser on ``raw`` (sections wrapped to record what it reads)."""
    from pretrain.parallelize import import_deepspeed

    import_deepspeed()
    from deepspeed.runtime import config as ds

    top = _Reads({k: _Reads(v) if isinstance(v, dict) else v for k, v in raw.items()})
    parsed = ds.DeepSpeedConfig.__new__(ds.DeepSpeedConfig)
    parsed.global_rank, parsed.world_size = 0, 1  # the parser reads them; the batch arithmetic is ours
    try:
        reject = getattr(ds, "_reject_removed_config_keys", None)  # DeepSpeed 0.19: removed features
        if reject is not None:
            reject(dict(raw))
        parsed._initialize_params(top)
    except Exception as e:  # noqa: BLE001 - DeepSpeed's own complaint, reported with the key below
        return top, e
    return top, None


@functools.lru_cache(maxsize=1)  # the parser is run once per process, not on every validate()
def _top_level_names() -> Optional[set]:
    """Every top-level key DeepSpeed's parser asks for (it asks for all of them, present or not; given
    a non-empty mapping, since some sections are only looked up then), plus the two it reads outside
    the parser. None when the parser fails on a minimal config: DeepSpeed's internals have changed."""
    top, error = _parse({"steps_per_print": 1})
    if error is not None:
        return None
    return {k for k in top.asked if isinstance(k, str)} | {"vocabulary_size", "sequence_parallel_size"}


def _hint(key: str, names) -> str:
    close = did_you_mean(key, names)
    return f" (did you mean {close}?)" if close else ""


def _pydantic_models() -> dict[str, type]:
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    out, todo = {}, [DeepSpeedConfigModel]
    while todo:
        cls = todo.pop()
        out.setdefault(cls.__name__, cls)
        todo += cls.__subclasses__()
    return out


def _model_fields(model: Optional[type], loc: tuple) -> set:
    """The field names (and aliases) of the model that ``loc`` (a pydantic error location) ends in."""
    from pydantic import BaseModel

    for part in loc:
        if model is None or part not in model.model_fields:
            return set()
        annotation = model.model_fields[part].annotation
        model = next((a for a in (annotation, *typing.get_args(annotation))
                      if isinstance(a, type) and issubclass(a, BaseModel)), None)
    if model is None:
        return set()
    return set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}


def _explain(section: str, error: Exception, prefix: str) -> ConfigError:
    """DeepSpeed's complaint about one section as a ``ConfigError`` naming the full key."""
    from pydantic import ValidationError

    if not isinstance(error, ValidationError):
        return ConfigError(f"{prefix}.{section}: DeepSpeed rejects it: {error}")
    model = _pydantic_models().get(error.title)
    first = error.errors()[0]
    loc = tuple(str(p) for p in first["loc"])
    # A model built from the top level (the monitors: tensorboard, wandb, ...) has the section in its path.
    where = ".".join((prefix, section, *(loc[1:] if loc[:1] == (section,) else loc)))
    if first["type"] == "extra_forbidden":
        return ConfigError(f"{where}: unknown DeepSpeed key{_hint(loc[-1], _model_fields(model, loc[:-1]))}")
    return ConfigError(f"{where}: {first['msg']} (got {first.get('input')!r})")


def check_deepspeed_keys(raw: dict, prefix: str = "pretrain.deepspeed") -> None:
    """Refuse a key under ``raw`` that DeepSpeed would ignore or reject: ``ConfigError`` naming
    ``prefix.KEY`` with the closest name DeepSpeed knows. DeepSpeed reads its top level key by key
    and silently ignores the rest, so the known names are the ones its parser asks for; inside a
    section, its pydantic models forbid extra keys, and a section read key by key is held to the keys
    read. Imports DeepSpeed (about 2 s): call it only for a non-empty ``raw``."""
    known = _top_level_names()
    if known is None:  # refusing every raw key because a DeepSpeed upgrade moved its parser would be worse
        return
    for key, value in raw.items():  # one section at a time, so that an error names its section
        top, error = _parse({key: value})
        if error is not None:  # e.g. a feature DeepSpeed removed, which it names
            raise _explain(key, error, prefix)
        if key not in known:
            raise ConfigError(f"{prefix}.{key}: unknown DeepSpeed key{_hint(str(key), known)}")
        section = top.get(key)
        # A section DeepSpeed reads key by key (flops_profiler, activation_checkpointing, ...) is held to
        # the keys read; one it reads none of went whole to a pydantic model, which checked it above.
        # The optimizer's and scheduler's keys are read only once their "type" is set, and a raw block
        # may rightly override just the "params" of ours.
        if isinstance(section, _Reads) and section.asked and key not in ("optimizer", "scheduler"):
            for sub in section:
                if sub not in section.asked:
                    raise ConfigError(f"{prefix}.{key}.{sub}: unknown DeepSpeed key{_hint(str(sub), section.asked)}")
