"""The fast-layout bf16 ``Linear`` computes what ``nn.Linear`` computes, and is used only where it pays."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.convert import timm_model_args, to_timm
from pretrain.cpu_bf16 import NATIVE_BF16, Linear
from pretrain.model import ViT, ViTConfig


def _grads(layer: nn.Module, x: torch.Tensor, autocast: bool):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    (y.float() ** 2).sum().backward()
    return y, x.grad, layer.weight.grad, layer.bias.grad


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "bf16-weights"])
@pytest.mark.parametrize("shape", [(6, 5, 24), (7, 24)])
def test_same_outputs_and_gradients_as_nn_linear(autocast, shape):
    torch.manual_seed(0)
    dtype = torch.float32 if autocast else torch.bfloat16
    ref = nn.Linear(24, 40).to(dtype)
    ours = Linear(24, 40).to(dtype)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(*shape, dtype=dtype)
    for a, b in zip(_grads(ours, x, autocast), _grads(ref, x, autocast)):
        assert a.dtype == b.dtype and a.shape == b.shape
        # Same bf16 products, fp32 accumulation in another order: equal up to bf16 rounding of the result.
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_used_exactly_where_bf16_matmuls_are_emulated():
    layer = Linear(8, 4)
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_fn = type(layer(x).grad_fn).__name__
    fp32_fn = type(layer(x).grad_fn).__name__
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).grad_fn is None
    assert fp32_fn != "_LinearFastLayoutBackward"
    if NATIVE_BF16:
        assert bf16_fn != "_LinearFastLayoutBackward"  # the CPU's own bf16 GEMM handles every layout
    else:
        assert bf16_fn == "_LinearFastLayoutBackward"


def test_vit_bf16_gradients_match_timm():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    cfg = ViTConfig.from_variant("mu/4", img_size=16, num_classes=10)
    ours = ViT(cfg)
    for p in ours.parameters():  # the zero head would leave no gradient to compare below it
        p.data.normal_(0, 0.2)
    theirs = timm.create_model("vit_base_patch16_224", pretrained=False, **timm_model_args(cfg))
    theirs.load_state_dict(to_timm(ours.state_dict(), cfg))
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([1, 2, 3, 4])
    grads = []
    for model in (ours, theirs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    theirs_by_ours = to_timm(grads[0], cfg)
    for k, g in grads[1].items():
        torch.testing.assert_close(theirs_by_ours[k], g, rtol=5e-2, atol=5e-3 * g.abs().max().item() + 1e-6)
