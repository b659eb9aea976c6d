"""Evaluation of a ViT without fine-tuning it: accuracy, frozen features, few-shot and linear probes.

Few-shot is big_vision's ``fewshot_lsr``: whiten the frozen features with the few-shot set's own
statistics, append a large constant feature as an (almost unregularised) bias, regress onto one-hot
targets rescaled to +-1 with an L2 penalty, in closed form through one eigen-decomposition, and
classify by the argmax. The linear probe is a multinomial logistic regression on the same frozen
features (scikit-learn, L-BFGS) whose L2 strength is picked on a dev split.

Images given as uint8 are scaled to [0, 1] and normalized with ``mean``/``std`` (default 0.5, 0.5: the
paper's [-1, 1] range); float images are taken as already normalized.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

BIAS_CONSTANT = 100.0  # big_vision's: large, so the bias is barely regularised
FEWSHOT_L2 = 2.0**10  # big_vision's fixed l2_reg for few-shot linear regression
PROBE_L2S = (1e-5, 1e-4, 1e-3, 1e-2)

Images = Union[torch.Tensor, Dataset]


PAPER_MEAN = PAPER_STD = (0.5, 0.5, 0.5)


def normalize(x: torch.Tensor, mean: Sequence[float] = PAPER_MEAN, std: Sequence[float] = PAPER_STD) -> torch.Tensor:
    """uint8 images (..., 3, H, W) to normalized floats; float images pass through unchanged."""
    if x.dtype != torch.uint8:
        return x.float()
    m = torch.tensor(mean).view(-1, 1, 1)
    s = torch.tensor(std).view(-1, 1, 1)
    return (x.float() / 255.0 - m) / s


def _batches(images: Images, batch_size: int) -> Iterable[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    if isinstance(images, torch.Tensor):
        for i in range(0, len(images), batch_size):
            yield images[i : i + batch_size], None
    else:
        for x, y in DataLoader(images, batch_size=batch_size, shuffle=False):
            yield x, y


@torch.no_grad()
def _map(fn: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, images: Images, batch_size: int,
         mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``fn`` over normalized batches in eval mode, concatenated on the CPU, plus the labels if any."""
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    outs, labels = [], []
    for x, y in _batches(images, batch_size):
        outs.append(fn(normalize(x, mean, std).to(param.device, param.dtype)).cpu())
        if y is not None:
            labels.append(torch.as_tensor(y))
    model.train(was_training)
    return torch.cat(outs), (torch.cat(labels) if labels else None)


def features(model: nn.Module, images: Images, batch_size: int = 256, mean: Sequence[float] = PAPER_MEAN,
             std: Sequence[float] = PAPER_STD) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Pooled pre-head features (N, width) in fp32 on the CPU, and the labels when ``images`` is a Dataset."""
    return _map(lambda x: model.forward_features(x).float(), model, images, batch_size, mean, std)


def accuracy(logits_or_preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy from logits (N, C) or predicted ids (N,)."""
    preds = logits_or_preds.argmax(dim=-1) if logits_or_preds.ndim == 2 else logits_or_preds
    return (preds.cpu() == labels.cpu()).float().mean().item()


# --------------------------------------------------------------------------- few-shot (closed form)


def _lsr_fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float) -> tuple[torch.Tensor, ...]:
    """Ridge regression of +-1 one-hot targets on whitened features; returns (weights, mean, std)."""
    x = x.double()
    mean = x.mean(dim=0, keepdim=True)
    std = x.std(dim=0, unbiased=False, keepdim=True) + 1e-5
    x = F.pad((x - mean) / std, (0, 1), value=BIAS_CONSTANT)  # (N, D+1)
    t = 2.0 * F.one_hot(y.long(), num_classes).double() - 1.0  # (N, C)
    n, d = x.shape
    # N >= D: (X^T X + l2 I)^-1 X^T t; D > N: X^T (X X^T + l2 I)^-1 t (the cheaper eigh of the two)
    if n >= d:
        eigs, q = torch.linalg.eigh(x.T @ x)
        w = (q / (eigs + l2)) @ (q.T @ (x.T @ t))
    else:
        eigs, q = torch.linalg.eigh(x @ x.T)
        w = ((x.T @ q) / (eigs + l2)) @ (q.T @ t)
    return w, mean, std


def _lsr_predict(w: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    x = F.pad((x.double() - mean) / std, (0, 1), value=BIAS_CONSTANT)
    return (x @ w).argmax(dim=-1)


def fewshot_sample(labels: torch.Tensor, shots: int, num_classes: int, seed: int) -> torch.Tensor:
    """Indices of ``shots`` examples per class (fewer where a class has fewer), the same for a seed."""
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        picked.append(idx[torch.randperm(len(idx), generator=g)[:shots]])
    return torch.cat(picked)


def fewshot_from_features(train_feats: torch.Tensor, train_y: torch.Tensor, test_feats: torch.Tensor,
                          test_y: torch.Tensor, shots: Sequence[int], num_classes: int, seed: int = 0,
                          l2: float = FEWSHOT_L2) -> dict[str, float]:
    """Few-shot accuracy per shot count: ``{"5shot": 0.83, ...}``."""
    train_y, test_y = torch.as_tensor(train_y), torch.as_tensor(test_y)
    out = {}
    for k in shots:
        idx = fewshot_sample(train_y, k, num_classes, seed)
        w, mean, std = _lsr_fit(train_feats[idx], train_y[idx], num_classes, l2)
        out[f"{k}shot"] = accuracy(_lsr_predict(w, mean, std, test_feats), test_y)
    return out


def fewshot_eval(model: nn.Module, train_x: Images, train_y: Optional[torch.Tensor], test_x: Images,
                 test_y: Optional[torch.Tensor], shots: list[int], num_classes: int,
                 seed: int) -> dict[str, float]:
    """Few-shot linear regression on the model's frozen features (big_vision's ``fewshot_lsr``).

    ``train_x`` / ``test_x``: image tensors (N, 3, H, W), or Datasets of (image, label), in which case
    the labels come from them and ``train_y`` / ``test_y`` may be None. Returns ``{"5shot": acc, ...}``.
    """
    f_tr, y_tr = features(model, train_x)
    f_te, y_te = features(model, test_x)
    train_y = y_tr if train_y is None else torch.as_tensor(train_y)
    test_y = y_te if test_y is None else torch.as_tensor(test_y)
    return fewshot_from_features(f_tr, train_y, f_te, test_y, shots, num_classes, seed)


# --------------------------------------------------------------------------- linear probe


def _logreg(x: torch.Tensor, y: torch.Tensor, l2: float, max_iter: int):
    """Multinomial logistic regression minimising mean cross-entropy + l2/2 |W|^2 (scikit-learn's L-BFGS)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter bounds the cost; the fit is still usable
        return LogisticRegression(C=1.0 / (l2 * len(y)), max_iter=max_iter).fit(x.numpy(), y.numpy())


def linear_probe(train_feats: torch.Tensor, train_y: torch.Tensor, dev_feats: torch.Tensor, dev_y: torch.Tensor,
                 test_feats: torch.Tensor, test_y: torch.Tensor, l2s: Sequence[float] = PROBE_L2S,
                 max_iter: int = 300) -> dict[str, float]:
    """Logistic regression on frozen features: L2 picked on dev, refit on train + dev, scored on test.

    Returns ``{"accuracy": test accuracy, "l2": chosen strength, "dev_accuracy": best dev accuracy}``.
    """
    mean = train_feats.double().mean(dim=0, keepdim=True)
    std = train_feats.double().std(dim=0, keepdim=True) + 1e-5

    def z(f: torch.Tensor) -> torch.Tensor:
        return (f.double() - mean) / std

    train_y, dev_y, test_y = (torch.as_tensor(t).long() for t in (train_y, dev_y, test_y))

    def score(model, f: torch.Tensor, y: torch.Tensor) -> float:
        return accuracy(torch.as_tensor(model.predict(z(f).numpy())), y)

    scores = {l2: score(_logreg(z(train_feats), train_y, l2, max_iter), dev_feats, dev_y) for l2 in l2s}
    best = max(l2s, key=lambda l2: (scores[l2], l2))  # ties go to the stronger penalty
    final = _logreg(torch.cat([z(train_feats), z(dev_feats)]), torch.cat([train_y, dev_y]), best, max_iter)
    return {"accuracy": score(final, test_feats, test_y), "l2": best, "dev_accuracy": scores[best]}
