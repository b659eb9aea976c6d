"""Decode and augment one sample, normalize and mix one batch (torchvision.transforms.v2).

Training: Inception crop (``v2.RandomResizedCrop`` with ``augment.crop_scale``), horizontal flip, optional
RandAugment; per batch: scale to float, normalize with ``augment.mean`` / ``augment.std``, optional
mixup / cutmix. Evaluation: resize the shorter side to ``img_size / crop_ratio``, center crop.

Decoding: the crop box is drawn from the JPEG header (``PIL.Image.open`` reads no pixels), so a JPEG much
larger than the crop needs is decoded at 1/2, 1/4 or 1/8 scale with Pillow's draft mode; all others go
through ``torchvision.io.decode_jpeg``, faster per core than Pillow on 256-px JPEGs (``vitscale bench
loader`` prints both; the README quotes its runs). Other formats go through Pillow.

Randomness comes from torch's global generator, seeded once per batch by the caller (``seeded``), so a
batch is a pure function of its raw samples and its seed: that is what makes resume exact.
"""
from __future__ import annotations

import contextlib
import io
import math
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from pretrain.config import AugmentConfig
from pretrain.errors import InputError

EVAL_CROP_RATIO = 0.875  # resize to img_size / 0.875 (256 for 224), then center crop: the usual eval protocol


class CorruptImage(Exception):
    """The bytes are not an image we can decode."""


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's global CPU generator at ``seed``, then put the caller's state back."""
    saved = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(saved)


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))  # header only: size and format, no pixels yet
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for garbage bytes
        raise CorruptImage(f"not an image ({type(e).__name__}: {e})") from None


def _draft_factor(im: Image.Image, crop_w: float, crop_h: float, out_w: int, out_h: int) -> int:
    """The largest JPEG DCT scale-down (1, 2, 4 or 8) that leaves the crop at least ``out_w`` x ``out_h``."""
    if im.format != "JPEG":
        return 1
    factor = 1
    while factor < 8 and crop_w >= 2 * factor * out_w and crop_h >= 2 * factor * out_h:
        factor *= 2
    return factor


def decode(data: bytes, im: Image.Image, factor: int = 1) -> torch.Tensor:
    """Pixels as uint8 [3, H, W]; ``factor`` > 1 decodes the JPEG at 1/factor scale (Pillow draft mode)."""
    if factor == 1 and im.format == "JPEG":
        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # a JPEG flavour torchvision rejects may still be one Pillow reads: let Pillow decide
    try:
        if factor > 1:
            # floor, because Pillow picks the scale as (full size // requested size)
            im.draft("RGB", (im.width // factor, im.height // factor))
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    except Exception as e:  # noqa: BLE001 - truncated or damaged data surfaces as many error types
        raise CorruptImage(f"cannot decode ({type(e).__name__}: {e})") from None


def normalize_batch(images: list[torch.Tensor], mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 [3, S, S] each -> float [B, 3, S, S] = (x / 255 - mean) / std.

    One image at a time while it is in cache instead of four passes over the whole 38 MB batch
    (to_dtype, scale, sub, div), and with the 1/255 folded into the scale. Inside a
    DataLoader worker the batch is allocated in shared memory, as ``default_collate`` does, so handing it
    to the trainer process costs no extra copy.
    """
    shape = (len(images), *images[0].shape)
    if get_worker_info() is not None:
        storage = torch.empty(0)._typed_storage()._new_shared(math.prod(shape), device="cpu")
        out = torch.empty(0).new(storage).resize_(shape)
    else:
        out = torch.empty(shape)
    scale = torch.tensor([1 / (255 * s) for s in std]).view(3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)]).view(3, 1, 1)
    for x, o in zip(images, out):
        o.copy_(x).mul_(scale).sub_(shift)  # three vectorised passes beat one mixed-dtype torch.mul 2x
    return out


class EvalTransform:
    """bytes -> uint8 [3, S, S]: shorter side to ``S / crop_ratio``, center crop S; then normalize a batch."""

    def __init__(self, img_size: int, mean, std, crop_ratio: float = EVAL_CROP_RATIO):
        self.size = [img_size, img_size]
        self.resize = int(round(img_size / crop_ratio))
        self.mean, self.std = list(mean), list(std)

    def sample(self, data: bytes, im: Optional[Image.Image] = None) -> torch.Tensor:
        """Decode, resize and center-crop one image to uint8 [3, S, S]. Raises CorruptImage."""
        im = im if im is not None else _open(data)
        short = min(im.width, im.height)
        x = decode(data, im, _draft_factor(im, short, short, self.resize, self.resize))
        x = F.resize(x, [self.resize], antialias=True)
        return F.center_crop(x, self.size)

    def batch(self, images: list[torch.Tensor], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [3, S, S] each -> normalized float [B, 3, S, S]; labels (ids or multi-hot) as a tensor."""
        return normalize_batch(images, self.mean, self.std), torch.as_tensor(labels)


class TrainTransform:
    """Per sample: bytes -> uint8 [3, S, S]; per batch: uint8 [B, 3, S, S] -> normalized float (+ mixup)."""

    def __init__(self, augment: AugmentConfig, img_size: int, num_classes: Optional[int] = None):
        self.size = [img_size, img_size]
        self.inception = augment.crop == "inception"
        self.crop = v2.RandomResizedCrop(img_size, scale=tuple(augment.crop_scale), antialias=True)
        self.flip = bool(augment.flip)
        self.randaugment = v2.RandAugment(*augment.randaugment) if augment.randaugment else None
        self.eval = EvalTransform(img_size, augment.mean, augment.std)
        self.mean, self.std = list(augment.mean), list(augment.std)
        mixers = []
        if augment.mixup > 0:
            mixers.append(v2.MixUp(alpha=augment.mixup, num_classes=num_classes))
        if augment.cutmix > 0:
            mixers.append(v2.CutMix(alpha=augment.cutmix, num_classes=num_classes))
        if mixers and not num_classes:
            raise InputError("augment.mixup / augment.cutmix need num_classes (soft targets are [B, num_classes])")
        self.mix = v2.RandomChoice(mixers) if len(mixers) > 1 else (mixers[0] if mixers else None)

    def sample(self, data: bytes) -> torch.Tensor:
        """Decode and crop one image to uint8 [3, S, S]. Raises CorruptImage."""
        im = _open(data)
        if self.inception:
            full_h, full_w = im.height, im.width
            p = self.crop.make_params([im])  # the box on the full-size image, from the header alone
            x = decode(data, im, _draft_factor(im, p["width"], p["height"], self.size[1], self.size[0]))
            sy, sx = x.shape[-2] / full_h, x.shape[-1] / full_w  # 1.0 unless decoded in draft mode
            x = F.resized_crop(x, int(p["top"] * sy), int(p["left"] * sx), max(1, round(p["height"] * sy)),
                               max(1, round(p["width"] * sx)), self.size, antialias=True)
        else:
            x = self.eval.sample(data, im)
        if self.flip and torch.rand(()) < 0.5:
            x = F.horizontal_flip(x)
        if self.randaugment is not None:
            x = self.randaugment(x)
        return x

    def batch(self, images: list[torch.Tensor], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [3, S, S] each -> normalized float [B, 3, S, S] and long [B] labels; with mixup/cutmix
        the labels become soft targets, float [B, num_classes]."""
        x, y = normalize_batch(images, self.mean, self.std), torch.as_tensor(labels)
        if self.mix is not None:
            x, y = self.mix(x, y)
        return x, y
