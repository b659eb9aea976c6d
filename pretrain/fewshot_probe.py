"""Few-shot accuracy during pretraining (big_vision's ``fewshot_lsr``) as one component of the loop.

The labelled sets are prepared once: ``max(shots)`` examples per class drawn from ``trainval`` in a
seeded order (the shot subsets are drawn from that pool), and a fixed seeded subset of at most
``TEST_MAX`` test images. Images are normalized like the training images. The closed-form regression
itself is ``pretrain.evaluate.fewshot_eval``, the same code the transfer stage runs.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Optional

import torch
from torch.utils.data import Dataset, Subset

from pretrain.config import AugmentConfig, FewshotConfig
from pretrain.evaluate import normalize

TEST_MAX = 2000  # test images per dataset: enough for a stable accuracy, cheap enough to run often


class _Normalized(Dataset):
    """(uint8 image, label) -> (float image normalized with the pretraining mean/std, label)."""

    def __init__(self, base: Dataset, mean: tuple, std: tuple):
        self.base, self.mean, self.std = base, mean, std

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[i]
        return normalize(image, self.mean, self.std), label


class FewshotProbe:
    """Few-shot accuracies of the model being trained on the ``pretrain.fewshot`` datasets."""

    def __init__(self, fewshot: FewshotConfig, img_size: int, data_root: Optional[str], seed: int,
                 augment: AugmentConfig):
        from pretrain.downstream import load_dataset

        self.shots = sorted(fewshot.shots)
        self.seed = seed
        self.sets = []
        for name in fewshot.datasets:
            pool = _Normalized(load_dataset(name, "trainval", img_size, data_root), augment.mean, augment.std)
            test = load_dataset(name, "test", img_size, data_root)
            g = torch.Generator().manual_seed(seed)
            keep = sorted(torch.randperm(len(test), generator=g)[:TEST_MAX].tolist())
            train_x, train_y = _per_class(pool, test.num_classes, self.shots[-1], seed)
            self.sets.append((name, train_x, train_y,
                              _Normalized(Subset(test, keep), augment.mean, augment.std), test.num_classes))

    def evaluate(self, engine, rank: int) -> dict[str, float]:
        """``{"fewshot_NAME_5shot": accuracy, ...}`` on rank 0, ``{}`` elsewhere.

        Every rank calls it and evaluates in lockstep: under ZeRO-3 each forward gathers the weights
        collectively (the root module's own parameters, which ``forward_features`` reaches without the
        root's forward hook, are gathered up front); without ZeRO-3 the others would only wait.
        """
        from pretrain.evaluate import fewshot_eval

        module = engine.module
        if engine.zero_optimization_stage() == 3:
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(list(module.parameters(recurse=False)))
        else:
            gathered = contextlib.nullcontext()
        out: dict[str, float] = {}
        with gathered:
            for name, train_x, train_y, test, num_classes in self.sets:
                accs = fewshot_eval(module, train_x, train_y, test, None, self.shots, num_classes, self.seed)
                out.update({f"fewshot_{name}_{k}": v for k, v in accs.items()})
        return out if rank == 0 else {}


def _per_class(pool: Dataset, num_classes: int, shots: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``shots`` examples per class, visiting ``pool`` in a seeded order until every class is full."""
    g = torch.Generator().manual_seed(seed + 1)
    taken: Counter = Counter()
    xs, ys = [], []
    for i in torch.randperm(len(pool), generator=g).tolist():
        image, label = pool[i]
        if taken[label] < shots:
            taken[label] += 1
            xs.append(image)
            ys.append(label)
            if len(ys) == shots * num_classes:
                break
    return torch.stack(xs), torch.tensor(ys)
