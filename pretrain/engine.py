"""DeepSpeed around the ViT: the config translated from ours, parameter groups, init, one train step.

Knows nothing about Ray or the launcher: ranks and the process group come from the environment that
Ray Train, ``torchrun`` or ``deepspeed`` set up. Checkpointing, compile and the wrap itself happen in
``pretrain/parallelize.py``, in that order.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from pretrain.config import ModelConfig, PretrainConfig
from pretrain.ds_config import deepspeed_config
from pretrain.losses import LossFn, make_loss
from pretrain.model import ViT, ViTConfig
from pretrain.parallelize import import_deepspeed, parallelize

# Parameters named like these keep their value under weight decay (besides every bias and norm).
NO_DECAY_NAMES = ("pos_embed", "cls_token")


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
    import_deepspeed().init_distributed(dist_backend="nccl" if use_gpu else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_gpu:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(rank, world, local_rank, device)


def vit_config(model_cfg: ModelConfig, num_classes: int) -> ViTConfig:
    """The architecture the ``model`` slice names: the one place a config becomes a ``ViTConfig``."""
    return ViTConfig.from_variant(
        model_cfg.variant, num_classes=num_classes, img_size=model_cfg.img_size, pool=model_cfg.pool,
        representation_size=model_cfg.representation_size, dropout=model_cfg.dropout,
        drop_path=model_cfg.drop_path,
    )


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


def build_engine(model: ViT, train_cfg: PretrainConfig, world_size: int, *, act_checkpoint: bool = False,
                 compile: bool = False):
    """The pretraining engine: ``parallelize`` with AdamW weight-decay groups and the ``pretrain`` slice's
    DeepSpeed config."""
    return parallelize(model, deepspeed_config(train_cfg, world_size), act_checkpoint=act_checkpoint,
                       compile=compile, model_parameters=param_groups(model, train_cfg.weight_decay))


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
