"""The Vision Transformer of "An Image is Worth 16x16 Words" (Dosovitskiy et al., ICLR 2021).

Only ``nn.Module``s: no distributed code, no Ray, DeepSpeed or MLflow. Activation checkpointing,
compile and the DeepSpeed wrap are applied from outside, in ``pretrain/parallelize.py``.
Module names follow timm's ``VisionTransformer`` where they can, so ``convert.py`` stays a table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import VARIANTS, parse_variant
from pretrain.cpu_bf16 import Linear


@dataclass(frozen=True)
class ViTConfig:
    """One ViT's shape and options; ``ViTConfig.from_variant("L/16", ...)`` fills the sizes from ``VARIANTS``."""

    width: int = 768
    depth: int = 12
    mlp: int = 3072
    heads: int = 12
    patch: int = 16
    img_size: int = 224
    num_classes: int = 1000
    pool: Literal["cls", "gap"] = "cls"
    representation_size: Optional[int] = None  # the paper's pre-logits layer (tanh), pretraining only
    dropout: float = 0.0
    drop_path: float = 0.0
    in_chans: int = 3

    @classmethod
    def from_variant(cls, variant: str, **kwargs) -> "ViTConfig":
        """The config of ``"NAME/PATCH"`` (e.g. ``"B/16"``), other fields from ``kwargs``."""
        name, patch = parse_variant(variant)
        return cls(**VARIANTS[name], patch=patch, **kwargs)

    @property
    def grid(self) -> int:
        """Patches per side at ``img_size``."""
        return self.img_size // self.patch

    @property
    def num_tokens(self) -> int:
        """Sequence length at ``img_size``: the patches, plus the class token when pooling by it."""
        return self.grid**2 + (1 if self.pool == "cls" else 0)


def macs_per_image(cfg: ViTConfig, img_size: Optional[int] = None) -> int:
    """Multiply-adds of one forward pass (patch embedding, attention, MLP, head).

    The count fvcore and timm's profiler use: ViT-B/16 at 224 px is 17.6 GMACs.
    """
    grid = (img_size or cfg.img_size) // cfg.patch
    n = grid * grid
    t = n + (1 if cfg.pool == "cls" else 0)
    d = cfg.width
    embed = n * d * cfg.in_chans * cfg.patch**2
    block = t * d * 3 * d + 2 * t * t * d + t * d * d + 2 * t * d * cfg.mlp
    rep = d * cfg.representation_size if cfg.representation_size else 0
    head = (cfg.representation_size or d) * cfg.num_classes
    return embed + cfg.depth * block + rep + head


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, H, T, d)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample."""
    if p == 0.0 or not training:
        return x
    # A comparison instead of ``bernoulli_(1 - p)``: torch.compile traces ``p`` as a symbol here, so the
    # blocks' different rates share one compiled graph (bernoulli_ would fix each rate: one graph per block).
    keep = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device) >= p
    return x * (keep / (1 - p)).to(x.dtype)


class Block(nn.Module):
    """Pre-norm transformer block: x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp: int, dropout: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp, dropout)
        self.drop = nn.Dropout(dropout)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.drop(self.attn(self.norm1(x))), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class ViT(nn.Module):
    """The paper's ViT: patch embedding, [class] token or average pooling, pre-norm blocks, head."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.img_size % cfg.patch:
            raise ValueError(f"img_size {cfg.img_size} is not a multiple of the patch size {cfg.patch}")
        self.cfg = cfg
        D = cfg.width
        self.patch_embed = nn.Conv2d(cfg.in_chans, D, kernel_size=cfg.patch, stride=cfg.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, D))
        self.pos_drop = nn.Dropout(cfg.dropout)
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(D, cfg.heads, cfg.mlp, cfg.dropout, r) for r in rates)
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.pre_logits = Linear(D, cfg.representation_size) if cfg.representation_size else None
        self.head = Linear(cfg.representation_size or D, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The reference (big_vision / timm 'jax') initialisation."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if "mlp" in name:
                    nn.init.normal_(m.bias, std=1e-6)
                else:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # LeCun normal as JAX has it: a normal truncated at 2 std, rescaled so the variance is 1/fan_in.
        # (torch's trunc_normal_ takes absolute bounds, hence a and b.)
        fan_in = self.patch_embed.in_channels * self.cfg.patch**2
        std = math.sqrt(1 / fan_in) / 0.87962566103423978  # std of a standard normal truncated to (-2, 2)
        nn.init.trunc_normal_(self.patch_embed.weight, std=std, a=-2 * std, b=2 * std)
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)  # bounds +-2 absolute, as timm: in effect normal
        if self.cls_token is not None:
            nn.init.zeros_(self.cls_token)
        if isinstance(self.head, nn.Linear):  # zero head: the paper's choice, and what fine-tuning needs
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, D, h, w)
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        pos = self.pos_embed
        if grid != (self.cfg.grid, self.cfg.grid):  # another resolution than trained at (paper §3.2)
            pos = resample_pos_embed(pos, grid, num_prefix_tokens=int(self.cls_token is not None))
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+N, D)
        return self.pos_drop(x + pos)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final LayerNorm, shape (B, T, width)."""
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] if self.cfg.pool == "cls" else x.mean(dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled representation before the head, shape (B, width)."""
        return self.pool(self.forward_tokens(x))

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        """Logits from pooled features: the optional tanh pre-logits layer, then the linear head."""
        if self.pre_logits is not None:
            feats = torch.tanh(self.pre_logits(feats))
        return self.head(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
    old_grid: Optional[tuple[int, int]] = None,
) -> torch.Tensor:
    """2-D bicubic interpolation of position embeddings (1, prefix + h*w, D) to a new patch grid (paper §3.2).

    Prefix tokens (the class token) are kept aside unchanged. ``old_grid`` defaults to a square grid.
    Same arithmetic as timm's ``resample_abs_pos_embed`` defaults: fp32, bicubic, antialias on (which
    only changes downsampling), align_corners off.
    """
    prefix, grid_tokens = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n = grid_tokens.shape[1]
    if old_grid is None:
        side = math.isqrt(n)
        old_grid = (side, side)
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid[0] * old_grid[1] != n:
        raise ValueError(f"position embedding of {n} tokens is not a {old_grid[0]}x{old_grid[1]} grid")
    if old_grid == new_grid:
        return pos_embed
    dtype = pos_embed.dtype
    g = grid_tokens.reshape(1, *old_grid, -1).permute(0, 3, 1, 2).float()  # (1, D, h, w)
    g = F.interpolate(g, size=new_grid, mode="bicubic", antialias=True, align_corners=False)
    g = g.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], -1).to(dtype)  # (1, h'*w', D)
    return torch.cat([prefix, g], dim=1)


def num_params(model: nn.Module) -> int:
    """Number of parameters (elements), e.g. 86.6M for B/16 with 1000 classes."""
    return sum(p.numel() for p in model.parameters())
