"""The ViT itself: shapes for every variant, sizes, initialisation, resampling, checkpointing, MACs.

Real-size variants run on the meta device (shapes only, no memory, no arithmetic); the debug sizes
and Ti run for real on the CPU.
"""
from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch.utils.flop_counter import FlopCounterMode

from pretrain.model import VARIANTS, ViT, ViTConfig, macs_per_image, num_params, parse_variant, resample_pos_embed

PAPER_SIZES = ["Ti/16", "S/16", "B/16", "L/16", "H/14", "g/14"]


def _meta_model(variant: str, **kw) -> ViT:
    with torch.device("meta"):
        return ViT(ViTConfig.from_variant(variant, **kw))


def test_variants_table_has_the_papers_sizes():
    assert {"Ti", "S", "B", "L", "H", "g"} <= set(VARIANTS)
    assert VARIANTS["B"] == dict(width=768, depth=12, mlp=3072, heads=12)
    assert VARIANTS["L"] == dict(width=1024, depth=24, mlp=4096, heads=16)
    assert VARIANTS["H"] == dict(width=1280, depth=32, mlp=5120, heads=16)


@pytest.mark.parametrize("variant", PAPER_SIZES)
def test_output_shapes_every_variant(variant):
    name, patch = parse_variant(variant)
    width = VARIANTS[name]["width"]
    model = _meta_model(variant, img_size=224, num_classes=10)
    # the trained size and a non-square other one (resampled position embeddings)
    for h, w in [(224, 224), (patch * 8, patch * 12)]:
        tokens = model.forward_tokens(torch.empty(2, 3, h, w, device="meta"))
        assert tokens.shape == (2, (h // patch) * (w // patch) + 1, width)
        assert model.pool(tokens).shape == (2, width)
        assert model.forward_head(model.pool(tokens)).shape == (2, 10)
    gap = _meta_model(variant, img_size=224, num_classes=10, pool="gap")
    x = torch.empty(2, 3, patch * 18, patch * 18, device="meta")  # larger than trained
    assert gap.forward_features(x).shape == (2, width)
    assert gap(x).shape == (2, 10)


@pytest.mark.parametrize("variant,img", [("Ti/16", 32), ("tiny/4", 32), ("mu/4", 16), ("mu/8", 48)])
@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_output_shapes_real_compute(variant, img, pool):
    torch.manual_seed(0)
    model = ViT(ViTConfig.from_variant(variant, img_size=img, pool=pool, num_classes=7)).eval()
    for size in (img, 2 * img):
        out = model(torch.randn(3, 3, size, size))
        assert out.shape == (3, 7) and torch.isfinite(out).all()


def test_representation_size_and_headless_shapes():
    model = ViT(ViTConfig.from_variant("mu/4", img_size=16, representation_size=32, num_classes=5))
    assert model.pre_logits.weight.shape == (32, 48) and model.head.weight.shape == (5, 32)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)
    headless = ViT(ViTConfig.from_variant("mu/4", img_size=16, num_classes=0))
    assert headless(torch.randn(2, 3, 16, 16)).shape == (2, 48)


@pytest.mark.parametrize("variant,timm_name,millions", [
    ("B/16", "vit_base_patch16_224", 86.6),
    ("L/16", "vit_large_patch16_224", 304.3),
    ("H/14", "vit_huge_patch14_224", 632.0),
])
def test_parameter_counts_match_timm_and_the_paper(variant, timm_name, millions):
    ours = num_params(_meta_model(variant, num_classes=1000))
    with torch.device("meta"):
        theirs = timm.create_model(timm_name, pretrained=False, num_classes=1000)
    assert ours == sum(p.numel() for p in theirs.parameters())
    assert round(ours / 1e6, 1) == millions


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        ViT(ViTConfig.from_variant("mu/4", img_size=18))
    with pytest.raises(ValueError, match="not divisible by heads"):
        ViT(ViTConfig(width=50, heads=3, depth=1, mlp=8, patch=4, img_size=8))
    for bad in ["B16", "Q/16", "B/", "/16", "B/16/2"]:
        with pytest.raises(ValueError, match="NAME/PATCH"):
            parse_variant(bad)
    assert parse_variant(" L/16 ") == ("L", 16)


def test_initialisation_as_the_reference():
    torch.manual_seed(0)
    model = ViT(ViTConfig.from_variant("Ti/16", img_size=224))
    assert model.head.weight.abs().sum() == 0 and model.head.bias.abs().sum() == 0
    assert model.cls_token.abs().sum() == 0
    assert abs(model.pos_embed.std().item() - 0.02) < 0.001  # 197 x 192 truncated-normal samples
    w, fan_in = model.patch_embed.weight, 3 * 16 * 16  # LeCun normal, truncated at 2 std as in JAX
    assert abs(w.std().item() * fan_in**0.5 - 1) < 0.02
    assert w.abs().max() <= 2 * fan_in**-0.5 / 0.87962566103423978
    block = model.blocks[0]
    assert torch.equal(block.norm1.weight, torch.ones(192)) and block.norm1.bias.abs().sum() == 0
    assert block.attn.qkv.bias.abs().sum() == 0
    assert 0 < block.mlp.fc1.bias.abs().max() < 1e-5  # normal(std=1e-6)
    limit = (6 / (192 + 768)) ** 0.5  # xavier uniform
    assert block.mlp.fc1.weight.abs().max() <= limit and block.mlp.fc1.weight.abs().max() > 0.9 * limit


@pytest.mark.parametrize("old,new,prefix", [
    ((14, 14), (24, 24), 1),   # fine-tuning at a higher resolution (paper §3.2)
    ((24, 24), (7, 7), 1),     # downsampling, where antialiasing matters
    ((8, 8), (5, 11), 0),      # non-square target, no class token
    ((6, 4), (9, 6), 1),       # non-square source
])
def test_resample_pos_embed_matches_timm(old, new, prefix):
    torch.manual_seed(0)
    pos = torch.randn(1, prefix + old[0] * old[1], 32)
    ours = resample_pos_embed(pos, new, num_prefix_tokens=prefix, old_grid=old)
    theirs = resample_abs_pos_embed(pos, list(new), old_size=list(old), num_prefix_tokens=prefix)
    assert ours.shape == (1, prefix + new[0] * new[1], 32)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours[:, :prefix], pos[:, :prefix])


def test_resample_antialias_is_what_timm_does():
    """The parity above is meaningful: without antialias, downsampling would give other values."""
    pos = torch.randn(1, 1 + 24 * 24, 16)
    plain = resample_abs_pos_embed(pos, [7, 7], antialias=False)
    assert not torch.allclose(resample_pos_embed(pos, (7, 7)), plain, atol=1e-3)
    assert resample_pos_embed(pos, (24, 24)) is pos
    with pytest.raises(ValueError, match="not a 3x3 grid"):
        resample_pos_embed(pos[:, :11], (4, 4), old_grid=(3, 3))


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_other_resolution_matches_timm_dynamic_img_size(pool):
    """The model resamples its own position embeddings as timm's dynamic_img_size does."""
    from pretrain.convert import from_timm, timm_model_args

    cfg = ViTConfig.from_variant("mu/4", img_size=16, pool=pool, num_classes=5)
    torch.manual_seed(0)
    theirs = timm.create_model("vit_base_patch16_224", pretrained=False, dynamic_img_size=True,
                               **timm_model_args(cfg)).eval()
    for p in theirs.parameters():
        p.data.normal_(0, 0.1)
    ours = ViT(cfg).eval()
    ours.load_state_dict(from_timm(theirs.state_dict(), cfg))
    x = torch.randn(2, 3, 28, 20)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)


def _grads(act_checkpoint: bool, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    from pretrain.parallelize import apply_act_checkpoint

    torch.manual_seed(0)
    model = ViT(ViTConfig.from_variant("mu/4", img_size=16, num_classes=5, dropout=0.1, drop_path=0.2)).train()
    for p in model.parameters():  # non-zero head so every gradient is non-trivial
        p.data.add_(torch.randn_like(p) * 0.02)
    names = list(model.state_dict())
    if act_checkpoint:  # applied from outside, as pretraining does; the names must not change
        apply_act_checkpoint(model)
    assert list(model.state_dict()) == names
    torch.manual_seed(1)  # same dropout / stochastic-depth draws in both runs
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    grads["_saved_numel"] = torch.tensor(sum(saved))
    return grads


def test_activation_checkpointing_same_gradients():
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    plain, ckpt = _grads(False, x, y), _grads(True, x, y)
    assert ckpt.pop("_saved_numel") < plain.pop("_saved_numel")  # it did checkpoint: less was kept
    assert plain.keys() == ckpt.keys()
    for name in plain:
        assert plain[name].abs().sum() > 0, name
        torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=1e-7, msg=name)


def test_drop_path_and_dropout_only_in_training():
    model = ViT(ViTConfig.from_variant("mu/4", img_size=16, dropout=0.5, drop_path=0.5, num_classes=3))
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, model(x))


def test_macs_b16_is_17_6_giga():
    assert abs(macs_per_image(ViTConfig.from_variant("B/16")) / 17.6e9 - 1) < 0.01


@pytest.mark.parametrize("kw", [
    dict(variant="B/16", img_size=224),
    dict(variant="L/16", img_size=384, pool="gap"),
    dict(variant="H/14", img_size=224, representation_size=1280, num_classes=21843),
])
def test_macs_equal_torch_flop_counter(kw):
    """macs_per_image is half of what torch's FlopCounterMode counts (on the meta device, no arithmetic)."""
    kw = dict(kw)
    model = _meta_model(kw.pop("variant"), **kw).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.empty(1, 3, model.cfg.img_size, model.cfg.img_size, device="meta"))
    assert counter.get_total_flops() == 2 * macs_per_image(model.cfg)
