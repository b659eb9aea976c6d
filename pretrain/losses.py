"""The pretraining losses, chosen by ``pretrain.loss``.

- ``softmax``: cross-entropy over the classes, one label per image (ImageNet-style); labels are class
  ids or, with mixup/cutmix, soft targets.
- ``sigmoid``: every class its own binary problem, summed over classes and averaged over the batch
  (big_vision's ``sigmoid_xent``): what JFT-300M, a multi-label set, was trained with, and what
  big_vision uses for ImageNet-21k. Labels are multi-hot (or class ids, made one-hot).

``label_smoothing`` moves that much of the target mass uniformly onto all classes, for both.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

SIGMOID_HEAD_BIAS = -10.0  # big_vision: every class starts near p = 4.5e-5, the prior of a rare label

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Float [B, C] targets from class ids [B] (one-hot) or targets that already are [B, C]."""
    if labels.dtype in (torch.int64, torch.int32):
        return F.one_hot(labels, num_classes).float()
    return labels.float()


def make_loss(kind: str, label_smoothing: float = 0.0) -> LossFn:
    """``loss(logits [B, C], labels) -> scalar`` for ``kind`` softmax or sigmoid."""
    if kind == "softmax":
        return lambda logits, labels: F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    if kind == "sigmoid":
        def sigmoid_xent(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            t = targets(labels, logits.shape[-1])
            if label_smoothing:
                t = t * (1 - label_smoothing) + label_smoothing / logits.shape[-1]
            return F.binary_cross_entropy_with_logits(logits.float(), t, reduction="none").sum(-1).mean()

        return sigmoid_xent
    raise ValueError(f"pretrain.loss: softmax or sigmoid, got {kind!r}")


def init_head_for(model: torch.nn.Module, kind: str) -> None:
    """The sigmoid loss starts from a head bias of ``SIGMOID_HEAD_BIAS`` (softmax: the model's own init)."""
    if kind == "sigmoid" and getattr(model, "head", None) is not None and model.head.bias is not None:
        with torch.no_grad():
            model.head.bias.fill_(SIGMOID_HEAD_BIAS)


def correct_at_1(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per image, 1 when the top-scoring class is a true one: top-1 accuracy for class ids,
    precision@1 for multi-hot labels."""
    top = logits.argmax(-1)
    if labels.dtype in (torch.int64, torch.int32):
        return (top == labels).float()
    return labels.gather(-1, top[:, None]).squeeze(-1).gt(0).float()
