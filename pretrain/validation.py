"""Held-out validation during pretraining: the shards' ``holdout`` part (``shard.holdout``), every sample
once across all ranks, every ``pretrain.eval_every`` steps: mean loss and top-1 (one label per image) or
precision@1 (multi-label: the top class is one of the image's labels)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from pretrain import storage
from pretrain.config import AugmentConfig
from pretrain.engine import input_dtype
from pretrain.losses import LossFn, correct_at_1


def holdout_shards(manifest: Optional[dict], shard_urls: list[str]) -> tuple[list[str], list[int]]:
    """(urls, sample counts) of the manifest's held-out shards, beside its training shards."""
    if not manifest or not manifest.get("holdout") or not shard_urls:
        return [], []
    folder = storage.parent(shard_urls[0])
    return ([storage.join(folder, s["name"]) for s in manifest["holdout"]],
            [int(s["samples"]) for s in manifest["holdout"]])


class HoldoutEval:
    """One exactly-once pass over the held-out shards per ``evaluate``; collective (every rank calls it)."""

    def __init__(self, urls: list[str], sizes: list[int], *, batch_size: int, rank: int, world_size: int,
                 img_size: int, label_key: str, augment: AugmentConfig, num_classes: int, multi_label: bool):
        from pretrain.data import make_eval_loader

        self.multi, self.img_size = multi_label, img_size
        self.loader = make_eval_loader(urls, batch_size=batch_size, rank=rank, world_size=world_size,
                                       img_size=img_size, label_key=label_key, num_workers=1,
                                       mean=tuple(augment.mean), std=tuple(augment.std), shard_sizes=sizes,
                                       **({"num_classes": num_classes, "multi_label": True} if multi_label else {}))

    @torch.no_grad()
    def evaluate(self, engine, loss_fn: LossFn) -> dict[str, float]:
        """``val_loss``, ``val_top1`` (or ``val_prec1``) and ``val_samples`` over all ranks.

        The ranks run forwards in lockstep (ZeRO-3 gathers weights collectively in each forward): a rank
        out of batches runs a throwaway one-image forward while others still have some."""
        device, dtype = engine.device, input_dtype(engine)
        sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss x n, correct, n
        batches = iter(self.loader)
        engine.eval()
        try:
            while True:
                batch = next(batches, None)
                more = torch.tensor([batch is not None], device=device, dtype=torch.int32)
                dist.all_reduce(more, op=dist.ReduceOp.MAX)
                if not more.item():
                    break
                if batch is None:
                    engine(torch.zeros(1, 3, self.img_size, self.img_size, device=device, dtype=dtype))
                    continue
                images, labels = batch[0].to(device, dtype), batch[1].to(device)
                logits = engine(images).float()
                n = images.shape[0]
                sums += torch.stack([loss_fn(logits, labels).double() * n, correct_at_1(logits, labels).sum().double(),
                                     torch.tensor(float(n), device=device, dtype=torch.float64)])
        finally:
            engine.train()
        dist.all_reduce(sums)
        loss_n, correct, n = sums.tolist()
        name = "val_prec1" if self.multi else "val_top1"
        return {"val_loss": loss_n / max(n, 1), name: correct / max(n, 1), "val_samples": n}
