"""Parallelism applied to a ViT from outside, in one place and one fixed order (torchtitan's
``parallelize.py``). The model itself never knows it is checkpointed, compiled or sharded.

1. Activation checkpointing, per block: first, so the block that compile sees already holds its
   recompute boundary (dynamo traces ``torch.utils.checkpoint`` as one region of the graph).
2. ``torch.compile``, per block: after checkpointing and before DeepSpeed, so ZeRO's parameter hooks
   land on the same parameters under the same names as in the eager model (checkpoints and exports
   stay interchangeable).
3. The DeepSpeed wrap (ZeRO partitioning, optimizer, LR schedule), last, over the finished module.
"""
from __future__ import annotations

import importlib
import sys
from typing import Iterable, Optional

import torch
from torch.utils.checkpoint import checkpoint

from pretrain.model import ViT


def import_deepspeed():
    """``import deepspeed``, minus the ``import mlflow`` that DeepSpeed's autotuner (never run here)
    makes at import time: a noticeable share of every rank's start-up, when only rank 0 logs to
    MLflow and imports it itself when it does."""
    if "deepspeed" not in sys.modules and "mlflow" not in sys.modules:
        sys.modules["mlflow"] = None  # ``import mlflow`` raises ImportError, which DeepSpeed catches
        try:
            return importlib.import_module("deepspeed")
        finally:
            del sys.modules["mlflow"]
    return importlib.import_module("deepspeed")


def apply_act_checkpoint(model: ViT) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them.

    The block's ``forward`` is replaced on the instance rather than the block wrapped in another
    module, so parameter names (and with them checkpoints and exports) do not change. Evaluation and
    ``torch.no_grad`` run the plain forward: there is nothing to recompute.
    """
    for block in model.blocks:
        plain = block.forward

        def forward(x: torch.Tensor, _plain=plain, _block=block) -> torch.Tensor:
            if _block.training and torch.is_grad_enabled():
                return checkpoint(_plain, x, use_reentrant=False)
            return _plain(x)

        block.forward = forward


def compile_blocks(model: ViT, mode: Optional[str] = None) -> None:
    """``torch.compile`` each transformer block in place.

    Per block rather than the whole model: the blocks share one compiled graph (two with stochastic
    depth: the first block's rate is 0), so compile time does not grow with depth, and
    ``Module.compile`` keeps every parameter name. ``mode`` is torch.compile's (None: its default).
    """
    for block in model.blocks:
        block.compile(mode=mode)


def parallelize(model: ViT, ds_config: dict, *, act_checkpoint: bool = False, compile: bool = False,
                compile_mode: Optional[str] = None, model_parameters: Optional[Iterable] = None,
                optimizer: Optional[torch.optim.Optimizer] = None):
    """Checkpoint, compile, then wrap ``model`` in a DeepSpeed engine built from ``ds_config``
    (``pretrain/ds_config.py``). The optimizer is DeepSpeed's from the config, over
    ``model_parameters`` (e.g. weight-decay groups), unless a client ``optimizer`` is given."""
    if act_checkpoint:
        apply_act_checkpoint(model)
    if compile:
        compile_blocks(model, compile_mode)
    deepspeed = import_deepspeed()
    kwargs = {"optimizer": optimizer} if optimizer is not None else {
        "model_parameters": list(model_parameters) if model_parameters is not None else model.parameters()}
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config, **kwargs)
    return engine

