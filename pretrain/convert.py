"""Weight interop: timm state dicts and safetensors exports that timm itself can load.

Our module names mirror timm's ``VisionTransformer`` except the patch embedding (our ``patch_embed`` is the
conv, timm wraps it as ``patch_embed.proj``), so conversion is a short prefix table. Our two poolings are
timm's ``global_pool='token'`` and ``global_pool='avg', class_token=False, fc_norm=False`` (final LayerNorm,
then the mean over tokens). The paper's pre-logits layer has no timm counterpart.

An export directory holds ``model.safetensors`` (timm key names) and ``config.json`` in timm's Hugging Face
layout (``architecture``, ``num_classes``, ``model_args``, ``pretrained_cfg``) plus a ``vitscale`` section
with our ``ViTConfig``, so both ``load_safetensors(dir)`` and ``timm.create_model("local-dir:DIR",
pretrained=True)`` rebuild the model.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from pretrain import storage
from pretrain.errors import InputError
from pretrain.model import VARIANTS, ViT, ViTConfig, resample_pos_embed

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# (our prefix, timm prefix): every other key is spelled the same in both.
_RENAMES = (("patch_embed.", "patch_embed.proj."),)

# timm features our ViT does not have, with what to change on the timm side.
_TIMM_ONLY = {
    "fc_norm.": "fc_norm (build timm with fc_norm=False: our 'gap' pools after the final norm)",
    "norm_pre.": "norm_pre (pre_norm=True, as in CLIP)",
    "reg_token": "register tokens (reg_tokens > 0)",
    ".ls1.": "layer scale (init_values)",
    ".ls2.": "layer scale (init_values)",
    "attn_pool.": "attention pooling (global_pool='map')",
    ".q_norm.": "QK normalisation (qk_norm=True)",
    ".k_norm.": "QK normalisation (qk_norm=True)",
}

# Registered timm names for the paper's sizes, so an export names its architecture honestly. The
# ``model_args`` written beside it are complete, so any ViT name would rebuild the same model.
_TIMM_NAMES = {
    ("Ti", 16): "vit_tiny_patch16_224",
    ("S", 16): "vit_small_patch16_224",
    ("S", 32): "vit_small_patch32_224",
    ("B", 8): "vit_base_patch8_224",
    ("B", 16): "vit_base_patch16_224",
    ("B", 32): "vit_base_patch32_224",
    ("L", 16): "vit_large_patch16_224",
    ("L", 32): "vit_large_patch32_224",
    ("H", 14): "vit_huge_patch14_224",
    ("g", 14): "vit_giant_patch14_224",
}
_GENERIC_TIMM_NAME = "vit_base_patch16_224"


def _to_timm_key(key: str) -> str:
    for ours, theirs in _RENAMES:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return key


def _from_timm_key(key: str) -> str:
    for ours, theirs in _RENAMES:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return key


def expected_shapes(config: ViTConfig) -> dict[str, tuple[int, ...]]:
    """Our state-dict names and shapes for ``config``, without building a model (a test checks them
    against ``ViT(config).state_dict()``)."""
    D, M, C, P = config.width, config.mlp, config.in_chans, config.patch
    shapes: dict[str, tuple[int, ...]] = {"patch_embed.weight": (D, C, P, P), "patch_embed.bias": (D,)}
    if config.pool == "cls":
        shapes["cls_token"] = (1, 1, D)
    shapes["pos_embed"] = (1, config.num_tokens, D)
    block = {
        "norm1.weight": (D,), "norm1.bias": (D,),
        "attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,),
        "attn.proj.weight": (D, D), "attn.proj.bias": (D,),
        "norm2.weight": (D,), "norm2.bias": (D,),
        "mlp.fc1.weight": (M, D), "mlp.fc1.bias": (M,),
        "mlp.fc2.weight": (D, M), "mlp.fc2.bias": (D,),
    }
    for i in range(config.depth):
        shapes.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    shapes.update({"norm.weight": (D,), "norm.bias": (D,)})
    features = D
    if config.representation_size:
        features = config.representation_size
        shapes.update({"pre_logits.weight": (features, D), "pre_logits.bias": (features,)})
    if config.num_classes:
        shapes.update({"head.weight": (config.num_classes, features), "head.bias": (config.num_classes,)})
    return shapes


def _check_against(state: Mapping[str, torch.Tensor], config: ViTConfig, what: str) -> None:
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise InputError(
            f"{what} does not fit {config}: missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
            f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}"
        )
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise InputError(f"{what}: {key} has shape {tuple(state[key].shape)}, the config needs {tuple(shape)}")


def from_timm(state_dict: Mapping[str, torch.Tensor], config: ViTConfig) -> dict[str, torch.Tensor]:
    """A timm ``VisionTransformer`` state dict as ours for ``config`` (the tensors themselves, not copies).

    A position embedding for another grid is resampled to ``config.img_size`` (paper §3.2), as timm does
    when it loads a checkpoint; everything else must match exactly.
    """
    if config.representation_size:
        raise InputError(
            "from_timm: timm's VisionTransformer has no pre-logits layer; use representation_size=None"
        )
    for key in state_dict:
        for marker, feature in _TIMM_ONLY.items():
            if marker in key:
                raise InputError(f"from_timm: {key!r} belongs to {feature}, which our ViT does not have")
    ours = {_from_timm_key(k): v for k, v in state_dict.items()}
    pos = ours.get("pos_embed")
    if pos is not None and pos.ndim == 3 and pos.shape[1] != config.num_tokens:
        prefix = int(config.pool == "cls")
        ours["pos_embed"] = resample_pos_embed(pos, (config.grid, config.grid), num_prefix_tokens=prefix)
    _check_against(ours, config, "timm state dict")
    return ours


def to_timm(state_dict: Mapping[str, torch.Tensor], config: ViTConfig) -> dict[str, torch.Tensor]:
    """Our state dict as timm's ``VisionTransformer(**timm_model_args(config))`` names it."""
    if config.representation_size or any(k.startswith("pre_logits.") for k in state_dict):
        raise InputError(
            "to_timm: the pre-logits layer (representation_size) has no timm counterpart; "
            "drop it and the head for transfer (save_safetensors(..., drop_head=True)) or train without it"
        )
    _check_against(state_dict, config, "state dict")
    return {_to_timm_key(k): v for k, v in state_dict.items()}


def timm_model_args(config: ViTConfig) -> dict[str, Any]:
    """Keyword arguments of ``timm.create_model(name, **args)`` that build the same network as ``config``."""
    mlp_ratio = config.mlp / config.width
    if int(config.width * mlp_ratio) != config.mlp:  # timm sizes the MLP as int(width * ratio)
        raise InputError(f"mlp {config.mlp} cannot be written as timm's int(width * mlp_ratio)")
    return dict(
        img_size=config.img_size,
        patch_size=config.patch,
        in_chans=config.in_chans,
        num_classes=config.num_classes,
        embed_dim=config.width,
        depth=config.depth,
        num_heads=config.heads,
        mlp_ratio=mlp_ratio,
        class_token=config.pool == "cls",
        global_pool="token" if config.pool == "cls" else "avg",
        fc_norm=False,
        pos_drop_rate=config.dropout,
        proj_drop_rate=config.dropout,
        drop_path_rate=config.drop_path,
    )


def timm_architecture(config: ViTConfig) -> str:
    """The registered timm model name of ``config``'s size (a generic ViT name for the debug sizes)."""
    dims = dict(width=config.width, depth=config.depth, mlp=config.mlp, heads=config.heads)
    for name, spec in VARIANTS.items():
        if spec == dims:
            return _TIMM_NAMES.get((name, config.patch), _GENERIC_TIMM_NAME)
    return _GENERIC_TIMM_NAME


def _export_config(config: ViTConfig, mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, Any]:
    size = [config.in_chans, config.img_size, config.img_size]
    return {
        "architecture": timm_architecture(config),
        "num_classes": config.num_classes,
        "num_features": config.width,
        "global_pool": "token" if config.pool == "cls" else "avg",
        "model_args": timm_model_args(config),
        "pretrained_cfg": {
            "input_size": size,
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": list(mean),
            "std": list(std),
            "num_classes": config.num_classes,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
        "vitscale": dataclasses.asdict(config),
    }


def save_safetensors(
    model_or_state: Union[nn.Module, Mapping[str, torch.Tensor]],
    config: ViTConfig,
    out_dir: Union[str, Path],
    *,
    drop_head: bool = False,
    mean: tuple[float, ...] = (0.5, 0.5, 0.5),
    std: tuple[float, ...] = (0.5, 0.5, 0.5),
) -> Path:
    """Write ``out_dir/model.safetensors`` (timm names) and ``out_dir/config.json``; returns ``out_dir``.

    ``drop_head`` exports the backbone only (no pre-logits layer, no head, ``num_classes=0``): the paper's
    first step of transfer, and the only way to export a model trained with ``representation_size``.
    ``mean``/``std`` record the input normalisation (default: the paper's [-1, 1] scaling).
    Both files are written under temporary names and renamed, so a reader never sees half an export.
    ``out_dir`` is a local folder (``pretrain.loop`` uploads an export bound for object storage).
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else dict(model_or_state)
    if drop_head:
        state = {k: v for k, v in state.items() if not k.startswith(("pre_logits.", "head."))}
        config = dataclasses.replace(config, num_classes=0, representation_size=None)
    tensors = {k: v.detach().cpu().contiguous() for k, v in to_timm(state, config).items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp_weights, tmp_config = out / f".{WEIGHTS_FILE}.tmp", out / f".{CONFIG_FILE}.tmp"
    save_file(tensors, str(tmp_weights), metadata={"format": "pt"})
    tmp_config.write_text(json.dumps(_export_config(config, mean, std), indent=2) + "\n")
    storage.publish_file(str(tmp_weights), str(out / WEIGHTS_FILE))
    storage.publish_file(str(tmp_config), str(out / CONFIG_FILE))
    return out


def read_export_config(path: Union[str, Path]) -> ViTConfig:
    """The ``ViTConfig`` recorded in an export (its directory or its ``config.json``, ``vitscale`` section)."""
    file = Path(path)
    file = file if file.suffix == ".json" else file / CONFIG_FILE
    if not file.is_file():
        raise InputError(f"{file}: export config not found")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{file}: not valid JSON: {e}") from None
    section = data.get("vitscale") if isinstance(data, dict) else None
    if not isinstance(section, dict):
        raise InputError(f"{file}: no 'vitscale' section (not written by save_safetensors)")
    # Exports written before checkpointing moved out of the model recorded it; it was never architecture.
    section = {k: v for k, v in section.items() if k != "act_checkpoint"}
    fields = {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = sorted(set(section) - fields)
    if unknown:
        raise InputError(f"{file}: vitscale.{unknown[0]}: unknown key (allowed: {', '.join(sorted(fields))})")
    try:
        return ViTConfig(**section)
    except TypeError as e:
        raise InputError(f"{file}: vitscale: {e}") from None


def load_safetensors(path: Union[str, Path], device: Optional[Union[str, torch.device]] = None) -> tuple[ViT, ViTConfig]:
    """Rebuild ``(ViT, ViTConfig)`` from an export directory written by ``save_safetensors``."""
    out = Path(path)
    config = read_export_config(out)
    weights = out / WEIGHTS_FILE
    if not weights.is_file():
        raise InputError(f"{weights}: weights not found")
    try:
        state = load_file(str(weights), device=str(device or "cpu"))
    except (SafetensorError, OSError) as e:
        raise InputError(f"{weights}: cannot read safetensors: {e}") from None
    with torch.device("meta"):  # no initialisation: every tensor comes from the file
        model = ViT(config)
    model.load_state_dict(from_timm(state, config), assign=True)
    return model, config


__all__ = [
    "from_timm",
    "to_timm",
    "timm_model_args",
    "timm_architecture",
    "expected_shapes",
    "save_safetensors",
    "load_safetensors",
    "read_export_config",
    "WEIGHTS_FILE",
    "CONFIG_FILE",
]
