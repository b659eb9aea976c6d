"""DeepSpeed around the ViT: the config translated from ours, parameter groups, init, one train step.

Knows nothing about Ray or the launcher: ranks and the process group come from the environment that
Ray Train, ``torchrun`` or ``deepspeed`` set up. ``p`` below is the ``pretrain`` config slice and
``m`` the ``model`` slice, used duck-typed (the typed dataclasses, or namespaces read from a file).
"""
from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import nn

from pretrain.errors import InputError
from pretrain.losses import LossFn, make_loss
from pretrain.model import ViT, ViTConfig

# Parameters named like these keep their value under weight decay (besides every bias and norm).
NO_DECAY_NAMES = ("pos_embed", "cls_token")


def import_deepspeed():
    """``import deepspeed``, minus the ``import mlflow`` that DeepSpeed's autotuner (never run here)
    makes at import time: 2 s of start-up on every rank (measured on the CPU, of 5 s for all of
    DeepSpeed), when only rank 0 logs to MLflow and imports it itself when it does."""
    if "deepspeed" not in sys.modules and "mlflow" not in sys.modules:
        sys.modules["mlflow"] = None  # ``import mlflow`` raises ImportError, which DeepSpeed catches
        try:
            import deepspeed
        finally:
            del sys.modules["mlflow"]
    import deepspeed

    return deepspeed


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed(use_gpu: bool) -> DistInfo:
    """Join the process group the launcher describes (NCCL on GPUs, gloo on the CPU).

    Under Ray Train the group already exists and DeepSpeed only adopts it; under ``torchrun`` or
    ``deepspeed`` it is created here from RANK / WORLD_SIZE / MASTER_ADDR.
    """
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_gpu:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(rank, world, local_rank, device)


def build_model(m: Any, num_classes: int) -> ViT:
    """The ViT the ``model`` slice describes, with activation checkpointing switched from its option."""
    return ViT(vit_config(m, num_classes))


def vit_config(m: Any, num_classes: int) -> ViTConfig:
    return ViTConfig.from_variant(
        m.variant, num_classes=num_classes, img_size=m.img_size, pool=m.pool,
        representation_size=m.representation_size, dropout=m.dropout, drop_path=m.drop_path,
        act_checkpoint=m.act_checkpoint,
    )


def compile_blocks(model: ViT, mode: Optional[str] = None) -> None:
    """``torch.compile`` each transformer block in place, before the DeepSpeed wrap (torchtitan's order).

    Per block rather than the whole model: the blocks share one compiled graph (two with stochastic
    depth: the first block's rate is 0), so compile time does not grow with depth, and ``Module.compile``
    keeps every parameter name, so checkpoints and exports are those of the eager model. ``mode`` is
    torch.compile's (None: its default).
    """
    for block in model.blocks:
        block.compile(mode=mode)


def grad_accum_steps(p: Any, world_size: int) -> int:
    """global_batch / (micro_batch x world size); the world size is the one actually running."""
    per_step = p.micro_batch * world_size
    if p.global_batch % per_step:
        raise InputError(
            f"pretrain.global_batch: {p.global_batch} is not micro_batch x world size x an integer "
            f"({p.micro_batch} x {world_size} = {per_step})"
        )
    return p.global_batch // per_step


def _merge(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``, recursing into mappings (the user's raw DeepSpeed keys win)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def deepspeed_config(p: Any, world_size: int) -> dict:
    """The DeepSpeed JSON config for the ``pretrain`` slice; ``p.deepspeed`` keys are merged last."""
    accum = grad_accum_steps(p, world_size)
    warmup = max(1, p.warmup_steps)  # DeepSpeed's schedulers need at least one warmup step
    if p.schedule == "cosine":
        scheduler = {"type": "WarmupCosineLR", "params": {
            "total_num_steps": p.steps, "warmup_num_steps": warmup, "warmup_min_ratio": 0.0,
            "cos_min_ratio": 0.0, "warmup_type": "linear"}}
    else:
        scheduler = {"type": "WarmupDecayLR", "params": {
            "total_num_steps": p.steps, "warmup_num_steps": warmup, "warmup_min_lr": 0.0,
            "warmup_max_lr": p.lr, "warmup_type": "linear"}}
    # torch's AdamW (fused on GPUs) instead of DeepSpeed's FusedAdam: no JIT-compiled extension to build.
    adam = {"lr": p.lr, "betas": list(p.betas), "eps": 1e-8, "weight_decay": p.weight_decay, "torch_adam": True}
    if p.use_gpu:
        adam["fused"] = True
    cfg = {
        "train_batch_size": p.global_batch,
        "train_micro_batch_size_per_gpu": p.micro_batch,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": p.grad_clip,
        "optimizer": {"type": "AdamW", "params": adam},
        "scheduler": scheduler,
        "bf16": {"enabled": p.precision == "bf16"},
        "fp16": {"enabled": p.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": {"stage": p.zero_stage},
        "steps_per_print": 10**9,  # our loop logs; keep DeepSpeed's own step prints quiet
        "wall_clock_breakdown": False,
    }
    return _merge(cfg, dict(p.deepspeed or {}))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weights decay; biases, norm scales, the position embedding and class token don't."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim <= 1 or any(part in NO_DECAY_NAMES for part in name.split("."))
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_engine(model: nn.Module, p: Any, world_size: int):
    """``deepspeed.initialize`` with our config, AdamW param groups and the LR schedule."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, p.weight_decay),
        config=deepspeed_config(p, world_size),
    )
    return engine


def input_dtype(engine) -> torch.dtype:
    """The dtype the engine's parameters hold (inputs must match them: DeepSpeed does not autocast)."""
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's mean loss over the step's micro-batches (0-dim, detached)
    lr: float  # the learning rate this step used
    images: int  # images this rank trained on
    data_s: float  # seconds this rank waited for the loader


def train_step(engine, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
               loss_fn: Optional[LossFn] = None) -> StepResult:
    """One optimizer step: ``gradient_accumulation_steps`` micro-batches forward and backward, then
    DeepSpeed's step (clipping, AdamW, LR schedule). Labels are class ids, soft targets (mixup) or
    multi-hot; ``loss_fn`` defaults to softmax cross-entropy."""
    loss_fn = loss_fn or make_loss("softmax")
    dtype = input_dtype(engine)
    lr = float(engine.get_lr()[0])  # read before the step: afterwards the scheduler has moved on
    total = torch.zeros((), device=engine.device)
    images_seen, data_s = 0, 0.0
    accum = engine.gradient_accumulation_steps()
    for _ in range(accum):
        t0 = time.perf_counter()
        images, labels = next(batches)
        data_s += time.perf_counter() - t0
        images = images.to(engine.device, dtype, non_blocking=True)
        labels = labels.to(engine.device, non_blocking=True)
        loss = loss_fn(engine(images), labels)
        engine.backward(loss)  # DeepSpeed divides by the accumulation count
        engine.step()  # a no-op except at the accumulation boundary
        total += loss.detach()
        images_seen += images.shape[0]
    return StepResult(total / accum, lr, images_seen, data_s)


def grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float("nan") if norm is None else float(norm)


def full_state_dict(engine, rank: int) -> Optional[dict[str, torch.Tensor]]:
    """The model's fp32 weights, gathered from the ZeRO partitions. Collective: every rank calls it;
    rank 0 gets the CPU state dict, the others None."""
    from deepspeed.utils import safe_get_full_fp32_param

    out: dict[str, torch.Tensor] = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        if full is None:  # no fp32 master copy: the parameter itself is full precision and whole
            full = param.detach()
        if rank == 0:
            out[name] = full.float().cpu().clone()
    return out if rank == 0 else None
