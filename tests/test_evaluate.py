"""Few-shot least squares, linear probe and helpers of pretrain/evaluate.py (CPU, seconds)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.evaluate import (BIAS_CONSTANT, _lsr_fit, accuracy, features, fewshot_eval, fewshot_from_features,
                               fewshot_sample, linear_probe, normalize)
from pretrain.model import ViT, ViTConfig


def _clusters(n_per: int, classes: int, dim: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 3
    y = torch.arange(classes).repeat_interleave(n_per)
    x = centres[y] + spread * torch.randn(len(y), dim, generator=g)
    return x, y


@pytest.mark.parametrize("n,d", [(40, 8), (12, 30)])  # both branches: N >= D+1 and D+1 > N
def test_lsr_matches_direct_ridge_solution(n, d):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(n)) * 2 + 1
    y = torch.arange(n) % 4
    l2 = 3.0
    w, mean, std = _lsr_fit(x, y, 4, l2)
    # Independent: whiten with population std, append the bias column, solve the normal equations.
    xn = x.double().numpy()
    z = (xn - xn.mean(0)) / (xn.std(0) + 1e-5)
    z = np.concatenate([z, np.full((n, 1), BIAS_CONSTANT)], axis=1)
    t = 2.0 * np.eye(4)[y.numpy()] - 1.0
    expected = np.linalg.solve(z.T @ z + l2 * np.eye(d + 1), z.T @ t)
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-6, atol=1e-8)


def test_fewshot_separates_clusters_and_not_noise():
    x_tr, y_tr = _clusters(30, 5, 16, 1.0, seed=0)
    x_te, y_te = _clusters(20, 5, 16, 1.0, seed=1)
    good = fewshot_from_features(x_tr, y_tr, x_te, y_te, [1, 5, 10], 5, seed=0)
    assert set(good) == {"1shot", "5shot", "10shot"}
    assert good["10shot"] > 0.9
    noise = fewshot_from_features(torch.randn(150, 16), y_tr, torch.randn(100, 16), y_te, [10], 5, seed=0)
    assert noise["10shot"] < 0.5  # chance is 0.2


def test_fewshot_sample_is_per_class_and_seeded():
    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 2)
    idx = fewshot_sample(labels, 5, 3, seed=0)
    assert torch.bincount(labels[idx], minlength=3).tolist() == [5, 5, 2]  # class 2 has only two
    assert torch.equal(idx, fewshot_sample(labels, 5, 3, seed=0))
    assert not torch.equal(idx, fewshot_sample(labels, 5, 3, seed=1))


def test_fewshot_eval_on_a_model_uses_its_features():
    torch.manual_seed(0)
    model = ViT(ViTConfig.from_variant("mu/4", num_classes=3, img_size=16))
    x = torch.randint(0, 256, (30, 3, 16, 16), dtype=torch.uint8)
    y = torch.arange(30) % 3
    out = fewshot_eval(model, x[:20], y[:20], x[20:], y[20:], [2, 5], 3, 0)
    f_tr, _ = features(model, x[:20])
    f_te, _ = features(model, x[20:])
    assert out == fewshot_from_features(f_tr, y[:20], f_te, y[20:], [2, 5], 3, seed=0)
    assert model.training  # the evaluation restores the mode it found


def test_linear_probe_picks_l2_on_dev_and_scores_test():
    x_tr, y_tr = _clusters(40, 4, 12, 2.0, seed=0)
    x_dev, y_dev = _clusters(10, 4, 12, 2.0, seed=1)
    x_te, y_te = _clusters(25, 4, 12, 2.0, seed=2)
    out = linear_probe(x_tr, y_tr, x_dev, y_dev, x_te, y_te, l2s=(1e-3, 1e-1))
    assert out["l2"] in (1e-3, 1e-1)
    assert out["accuracy"] > 0.85
    shuffled = linear_probe(x_tr, y_tr[torch.randperm(len(y_tr))], x_dev, y_dev, x_te, y_te, l2s=(1e-2,))
    assert shuffled["accuracy"] < out["accuracy"]


def test_normalize_and_accuracy():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 2).expand(3, 1, 2)
    assert torch.allclose(normalize(x), torch.tensor([-1.0, 1.0]).view(1, 1, 2).expand(3, 1, 2))
    f = torch.randn(2, 3)
    assert normalize(f) is not None and torch.equal(normalize(f), f)
    assert accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1])) == 0.5
    assert accuracy(torch.tensor([1, 0, 1]), torch.tensor([1, 0, 0])) == pytest.approx(2 / 3)
