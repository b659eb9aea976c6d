"""A contact sheet of written shards: a few samples per class, each captioned with its label id and the
manifest's name for it, saved as ``preview.png`` beside the manifest (``vitscale shard ... --preview``).

What it is for: a label mapping that is off by one, classes swapped, a crop that cuts the object away
or images stretched out of shape show at a glance, before any GPU is spent. The tiles show the stored
JPEGs as the loader reads them (letterboxed, not cropped again), and the label is read the way the
loader reads it (``cls``, else ``json`` ``labels`` for multi-label shards).
"""
from __future__ import annotations

import io
import json
from collections import Counter
from typing import Optional

from PIL import Image, ImageDraw, ImageFont

from pretrain import storage
from pretrain.errors import InputError
from pretrain.shard_format import PREVIEW

TILE = 96  # pixels per sample, square
CAPTION = 14  # pixels of text under each tile
HEADER = 20  # pixels of text above the grid
MAX_SCAN = 5000  # samples read at most: shards are written in a shuffled order, so a few hundred usually do


def sheet_size(classes: int, per_class: int) -> tuple[int, int]:
    """(width, height) in pixels of a sheet of ``classes`` rows and ``per_class`` columns."""
    return per_class * TILE, HEADER + classes * (TILE + CAPTION)


def _label(sample: dict) -> Optional[list[int]]:
    """The sample's class ids (one for single-label shards), or None when it carries none."""
    if "cls" in sample:
        try:
            return [int(sample["cls"].decode().strip())]
        except ValueError:
            return None
    try:
        ids = json.loads(sample["json"]).get("labels") if "json" in sample else None
    except (ValueError, AttributeError):
        return None
    return [int(i) for i in ids] if isinstance(ids, list) and ids else None


def collect(urls: list[str], per_class: int, max_classes: int) -> dict[int, list[tuple[bytes, list[int]]]]:
    """``{first class id: [(image bytes, all class ids), ...]}``, at most ``per_class`` each, reading
    shards in order until ``max_classes`` classes are full or ``MAX_SCAN`` samples were read."""
    from pretrain.data import IMAGE_KEYS, read_shard

    found: dict[int, list[tuple[bytes, list[int]]]] = {}
    scanned, counts = 0, Counter()
    for url in urls:
        for sample in read_shard(url, counts):
            scanned += 1
            ids = _label(sample)
            image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
            if ids is not None and image is not None and len(found.setdefault(ids[0], [])) < per_class:
                found[ids[0]].append((image, ids))
            if sum(len(v) == per_class for v in found.values()) >= max_classes or scanned >= MAX_SCAN:
                return found
    return found


def _tile(data: bytes) -> Image.Image:
    """The image fitted into TILE x TILE, its aspect kept (a stretched or squashed shard shows as such)."""
    tile = Image.new("RGB", (TILE, TILE), (128, 128, 128))
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            im.thumbnail((TILE, TILE))
            tile.paste(im, ((TILE - im.width) // 2, (TILE - im.height) // 2))
    except Exception:  # noqa: BLE001 - PIL raises many types; an undecodable sample is shown as such
        ImageDraw.Draw(tile).text((4, TILE // 2 - 6), "undecodable", fill=(255, 255, 255))
    return tile


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-1]
    return text


def render(found: dict[int, list[tuple[bytes, list[int]]]], names: list[str], per_class: int,
           max_classes: int, title: str) -> Image.Image:
    """The sheet: one row per class (the fullest ``max_classes``, by id), one column per sample."""
    rows = sorted(sorted(found, key=lambda c: (-len(found[c]), c))[:max_classes])
    width, height = sheet_size(len(rows), per_class)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    draw.text((4, 4), _fit(draw, title, font, width - 8), fill=(0, 0, 0), font=font)

    def name(i: int) -> str:
        return names[i] if 0 <= i < len(names) else "?"

    for r, cls in enumerate(rows):
        y = HEADER + r * (TILE + CAPTION)
        for c, (data, ids) in enumerate(found[cls]):
            sheet.paste(_tile(data), (c * TILE, y))
            caption = ", ".join(f"{i} {name(i)}" for i in ids)
            draw.text((c * TILE + 2, y + TILE + 1), _fit(draw, caption, font, TILE - 4), fill=(0, 0, 0), font=font)
    return sheet


def write_preview(shards: str, png_path: Optional[str] = None, per_class: int = 4, max_classes: int = 12) -> str:
    """Draw the contact sheet of the shards at ``shards`` (a shard folder, a manifest or a pattern,
    local or URL) into ``png_path`` (default: ``preview.png`` in the shard folder); returns its path."""
    from pretrain.data import resolve_shards

    urls, manifest = resolve_shards(shards)
    names = list((manifest or {}).get("label_names") or [])
    found = collect(urls, per_class, max_classes)
    if not found:
        raise InputError(f"{shards}: no labelled image among the first samples (members cls or json labels)")
    shown = min(len(found), max_classes)
    title = f"{shown} of {len(names) or len(found)} classes, up to {per_class} samples each (label id, name): {shards}"
    sheet = render(found, names, per_class, max_classes, title)
    folder = shards if not shards.endswith((".json", ".tar")) and "{" not in shards else storage.parent(shards)
    png_path = png_path or storage.join(folder, PREVIEW)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    storage.write_bytes(png_path, buf.getvalue())
    return png_path
