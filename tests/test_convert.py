"""Weight interop with timm: exact round trips, logits parity, safetensors exports that timm loads.

Parity models get random values in every tensor (timm's own init leaves LayerNorms at 1/0, the class
token at 0 and, in 'jax' mode, the head at 0, which would hide mistakes there).
"""
from __future__ import annotations

import json

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

from pretrain.convert import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    expected_shapes,
    from_timm,
    load_safetensors,
    save_safetensors,
    timm_architecture,
    timm_model_args,
    to_timm,
)
from pretrain.errors import InputError
from pretrain.model import VARIANTS, ViT, ViTConfig


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # uniform: half the cost of normal for the 300M-parameter models
            p.uniform_(-0.04 if p.ndim > 1 else -0.4, 0.04 if p.ndim > 1 else 0.4, generator=gen)
    return model


def _timm_model(name: str, cfg: ViTConfig, state: dict | None = None, **extra) -> torch.nn.Module:
    """timm's ``name`` with our config's pooling: random values, or ``state``; built on meta (no init cost)."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, weight_init="skip", **{**timm_model_args(cfg), **extra})
    if state is not None:
        model.load_state_dict(state, assign=True)
        return model.eval()
    return _randomise(model.to_empty(device="cpu")).eval()


def _ours_from(state: dict, cfg: ViTConfig) -> ViT:
    with torch.device("meta"):
        model = ViT(cfg)
    model.load_state_dict(from_timm(state, cfg), assign=True)
    return model.eval()


def _tiny(**kw) -> ViTConfig:
    return ViTConfig.from_variant("mu/4", **{"img_size": 16, "num_classes": 5, **kw})


def _assert_parity(timm_name: str, variant: str, img: int, batch: int) -> None:
    """Both poolings; the 'gap' model reuses the random values of the 'cls' one (random numbers for
    300M parameters are the slow part of this test)."""
    x = torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(1))
    state = None
    for pool in ("cls", "gap"):
        cfg = ViTConfig.from_variant(variant, img_size=img, pool=pool, num_classes=1000)
        if state is not None:  # drop the class token and its position
            state = {k: v for k, v in state.items() if k != "cls_token"} | {"pos_embed": state["pos_embed"][:, 1:]}
        theirs = _timm_model(timm_name, cfg, state)
        state = theirs.state_dict()
        ours = _ours_from(state, cfg)  # shares the tensors: no copy of the weights
        with torch.no_grad():
            expected, got = theirs(x), ours(x)
        assert expected.abs().max() > 0.1  # a real signal, not zeros
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4, msg=f"{variant} {pool}")


def test_timm_parity_b16_224():
    _assert_parity("vit_base_patch16_224", "B/16", 224, batch=1)


def test_timm_parity_l16_224():
    _assert_parity("vit_large_patch16_224", "L/16", 224, batch=1)


@pytest.mark.slow
def test_timm_parity_h14_224():
    _assert_parity("vit_huge_patch14_224", "H/14", 224, batch=1)


@pytest.mark.parametrize("variant,kw", [
    ("mu/4", dict()), ("mu/4", dict(pool="gap")), ("mu/4", dict(num_classes=0)),
    ("mu/4", dict(representation_size=24)), ("mu/8", dict(img_size=24, in_chans=1)),
])
def test_expected_shapes_are_the_models(variant, kw):
    cfg = ViTConfig.from_variant(variant, **{"img_size": 16, **kw})
    assert expected_shapes(cfg) == {k: tuple(v.shape) for k, v in ViT(cfg).state_dict().items()}


@pytest.mark.parametrize("kw", [dict(pool="cls"), dict(pool="gap"), dict(num_classes=0)])
def test_round_trip_is_exact(kw):
    cfg = _tiny(**kw) if "num_classes" not in kw else ViTConfig.from_variant("mu/4", img_size=16, **kw)
    state = _randomise(ViT(cfg)).state_dict()
    timm_state = to_timm(state, cfg)
    assert "patch_embed.proj.weight" in timm_state and "patch_embed.weight" not in timm_state
    back = from_timm(timm_state, cfg)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], v) for k, v in state.items())
    # and timm's own model accepts the converted dict as is
    with torch.device("meta"):
        theirs = timm.create_model("vit_base_patch16_224", pretrained=False, **timm_model_args(cfg))
    theirs.load_state_dict(timm_state, strict=True, assign=True)
    assert from_timm(theirs.state_dict(), cfg).keys() == state.keys()


def test_timm_names_and_args_build_the_same_network():
    for name, spec in VARIANTS.items():
        for patch in (14, 16):
            cfg = ViTConfig(**spec, patch=patch, img_size=224)
            arch = timm_architecture(cfg)
            assert arch in timm.list_models("vit_*"), arch
            with torch.device("meta"):
                theirs = timm.create_model(arch, pretrained=False, weight_init="skip", **timm_model_args(cfg))
                ours = ViT(cfg)
            shapes = {k: v.shape for k, v in theirs.state_dict().items()}
            assert shapes == {k: v.shape for k, v in to_timm(ours.state_dict(), cfg).items()}, (name, patch)
    assert timm_architecture(ViTConfig.from_variant("L/16")) == "vit_large_patch16_224"
    assert timm_architecture(ViTConfig.from_variant("H/14")) == "vit_huge_patch14_224"


def test_from_timm_resamples_position_embeddings_to_the_config_grid():
    small, large = _tiny(), _tiny(img_size=28)
    theirs = _timm_model("vit_base_patch16_224", small)
    ours = from_timm(theirs.state_dict(), large)
    expected = resample_abs_pos_embed(theirs.pos_embed.detach(), [7, 7], num_prefix_tokens=1)
    assert torch.equal(ours["pos_embed"], expected)
    assert ours["pos_embed"].shape == ViT(large).pos_embed.shape


def test_from_timm_rejects_what_we_cannot_represent():
    cfg = _tiny(pool="gap")
    with torch.device("meta"):  # timm's default 'avg' pooling normalises after pooling (fc_norm)
        default_gap = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=16, patch_size=4,
                                        embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0, num_classes=5,
                                        class_token=False, global_pool="avg")
    with pytest.raises(InputError, match="fc_norm"):
        from_timm(default_gap.state_dict(), cfg)
    state = to_timm(ViT(_tiny()).state_dict(), _tiny())
    with pytest.raises(InputError, match="pre-logits"):
        from_timm(state, _tiny(representation_size=48))
    with pytest.raises(InputError, match="head.weight has shape"):
        from_timm(state, ViTConfig.from_variant("mu/4", img_size=16, num_classes=7))
    with pytest.raises(InputError, match="missing.*cls_token"):
        from_timm({k: v for k, v in state.items() if k != "cls_token"}, _tiny())
    with pytest.raises(InputError, match="layer scale"):
        from_timm({**state, "blocks.0.ls1.gamma": torch.ones(48)}, _tiny())


def test_to_timm_rejects_pre_logits():
    cfg = _tiny(representation_size=32)
    with pytest.raises(InputError, match="pre-logits layer .* has no timm counterpart"):
        to_timm(ViT(cfg).state_dict(), cfg)


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_safetensors_round_trip_and_timm_loads_it(tmp_path, pool):
    cfg = _tiny(pool=pool)
    model = _randomise(ViT(cfg)).eval()
    out = save_safetensors(model, cfg, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no temporary files left
    meta = json.loads((out / CONFIG_FILE).read_text())
    assert meta["model_args"]["global_pool"] == ("token" if pool == "cls" else "avg")
    x = torch.randn(3, 3, 16, 16)

    loaded, loaded_cfg = load_safetensors(out)
    assert loaded_cfg == cfg
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x))

    # timm itself rebuilds the architecture from config.json and loads the weights from the folder
    theirs = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert theirs.pretrained_cfg["mean"] == [0.5, 0.5, 0.5]
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x), rtol=0, atol=1e-5)


def test_safetensors_export_without_head_for_pre_logits_models(tmp_path):
    cfg = _tiny(representation_size=32)
    model = _randomise(ViT(cfg)).eval()
    with pytest.raises(InputError, match="drop_head=True"):
        save_safetensors(model, cfg, tmp_path / "a")
    out = save_safetensors(model.state_dict(), cfg, tmp_path / "b", drop_head=True)
    backbone, bcfg = load_safetensors(out)
    assert bcfg.num_classes == 0 and bcfg.representation_size is None
    theirs = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        feats = model.forward_features(x)
        torch.testing.assert_close(backbone.eval()(x), feats)
        torch.testing.assert_close(theirs(x), feats, rtol=0, atol=1e-5)


def test_load_safetensors_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match=f"{tmp_path / 'nothing' / CONFIG_FILE}.*not found"):
        load_safetensors(tmp_path / "nothing")
    out = save_safetensors(ViT(_tiny()), _tiny(), tmp_path / "x")
    (out / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match=f"{WEIGHTS_FILE}: cannot read"):
        load_safetensors(out)
    (out / WEIGHTS_FILE).unlink()
    with pytest.raises(InputError, match=f"{WEIGHTS_FILE}: weights not found"):
        load_safetensors(out)
    meta = json.loads((out / CONFIG_FILE).read_text())
    meta["vitscale"]["colour"] = "blue"
    (out / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(InputError, match="vitscale.colour: unknown key"):
        load_safetensors(out)
    (out / CONFIG_FILE).write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_safetensors(out)
    (out / CONFIG_FILE).write_text(json.dumps({"architecture": "vit_base_patch16_224"}))
    with pytest.raises(InputError, match="no 'vitscale' section"):
        load_safetensors(out)
