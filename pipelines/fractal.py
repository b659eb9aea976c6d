"""``builtin:fractal``: FractalDB-style images made by formula (Kataoka et al., "Pre-training without
Natural Images", ACCV 2020; Nakashima et al., AAAI 2022 pretrain ViTs on them).

Each class is a random iterated function system (IFS): 2 to 4 affine maps ``x -> A x + b`` with
parameters drawn from [-1, 1], kept only when every map contracts and the attractor fills enough of
the picture (FractalDB's filling-rate test). Each image of a class renders the attractor with the
chaos game after a small random weighting of the parameters (FractalDB's intra-class variation),
with a random flip and the class's colours per map, on black.

The images go to ``{root}/images/CLASS/NNNN.png`` with ``{root}/index.csv`` (path,label; rows in a
seeded random order so that every shard mixes the classes), and the shard stage reads them exactly
like a user's index. Everything is drawn from ``seed``; a finished set is
marked by ``{root}/fractal.json`` and reused while its settings are unchanged.
"""
from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
from PIL import Image

from pipelines.config import BuiltinSourceConfig

VERSION = 1  # bump when the images change for the same settings
INDEX = "index.csv"
MARKER = "fractal.json"  # written last: the set under this folder is complete
MIN_FILL = 0.12  # fraction of pixels the attractor must cover (at 32 px) to be a class
CHAINS = 256  # parallel chaos-game chains per image
MAX_TRIES = 10_000


def builtin_fingerprint(settings: BuiltinSourceConfig, seed: int) -> dict:
    """What decides the generated images (and so the shards made from them)."""
    return {"kind": "builtin", "name": "fractal", "version": VERSION, "seed": seed,
            "classes": settings.classes, "images_per_class": settings.images_per_class,
            "image_size": settings.image_size}


def class_name(index: int, classes: int) -> str:
    return f"fractal_{index:0{max(3, len(str(classes - 1)))}d}"


def generate(root: str, settings: BuiltinSourceConfig, seed: int) -> str:
    """Write the image set under ``root`` unless it is already there; return the index path."""
    marker = os.path.join(root, MARKER)
    index = os.path.join(root, INDEX)
    want = builtin_fingerprint(settings, seed)
    try:
        with open(marker) as f:
            if json.load(f) == want and os.path.isfile(index):
                return index
    except (OSError, ValueError):
        pass
    shutil.rmtree(os.path.join(root, "images"), ignore_errors=True)
    for stale in (marker, index):
        if os.path.exists(stale):
            os.remove(stale)
    rows = []
    size = settings.image_size
    points = max(4096, 4 * size * size)  # enough chaos-game points to draw the attractor solidly
    steps = -(-points // CHAINS)
    for c in range(settings.classes):
        name = class_name(c, settings.classes)
        folder = os.path.join(root, "images", name)
        os.makedirs(folder, exist_ok=True)
        rng = np.random.default_rng([seed, c])
        maps = sample_ifs(rng)
        for i, img in enumerate(render_class(rng, maps, settings.images_per_class, size, steps)):
            rel = f"images/{name}/{i:04d}.png"
            Image.fromarray(img).save(os.path.join(root, rel), compress_level=1)
            rows.append((rel, name))
    # Listed in a seeded random order: shards are cut in index order, and each should mix the classes.
    order = np.random.default_rng([seed, settings.classes, settings.images_per_class]).permutation(len(rows))
    with open(index + ".tmp", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows[i] for i in order)
    os.replace(index + ".tmp", index)
    with open(marker, "w") as f:
        json.dump(want, f)
    return index


def sample_ifs(rng: np.random.Generator) -> np.ndarray:
    """A random contractive IFS whose attractor passes the filling-rate test: ``(n, 6)`` rows
    ``a, b, c, d, e, f`` for ``x' = [[a, b], [c, d]] x + [e, f]``."""
    for _ in range(MAX_TRIES):
        n = int(rng.integers(2, 5))
        maps = rng.uniform(-1.0, 1.0, size=(n, 6))
        linear = maps[:, :4].reshape(n, 2, 2)
        if np.linalg.norm(linear, ord=2, axis=(1, 2)).max() >= 0.95:
            continue
        pts, _ = chaos_game(rng, maps[None], 2048 // 64, 64)
        if _fill_rate(pts[0], 32) >= MIN_FILL:
            return maps
    raise RuntimeError("no fractal passed the filling-rate test; this should not happen")


def _weights(maps: np.ndarray) -> np.ndarray:
    """FractalDB picks each map with probability proportional to |det A| (floored, so none vanishes)."""
    det = np.abs(maps[..., 0] * maps[..., 3] - maps[..., 1] * maps[..., 2])
    det = np.maximum(det, 0.02)
    return det / det.sum(axis=-1, keepdims=True)


def chaos_game(rng: np.random.Generator, maps: np.ndarray, steps: int,
               chains: int = CHAINS) -> tuple[np.ndarray, np.ndarray]:
    """Points on the attractors of ``maps`` ``(I, n, 6)``: returns points ``(I, P, 2)`` and the map
    that made each point ``(I, P)``; ``I`` systems run side by side, ``chains`` walks each.

    Every walk starts at the fixed point of the system's first map, which lies on the attractor, so
    no burn-in steps are thrown away and no stray points need trimming.
    """
    count, n = maps.shape[:2]
    cum = np.cumsum(_weights(maps), axis=-1).astype(np.float32)  # (I, n)
    a, b, c, d, e, f = (np.ascontiguousarray(maps[..., j].reshape(-1), dtype=np.float32) for j in range(6))
    lin = maps[:, 0, :4].reshape(count, 2, 2)
    start = np.linalg.solve(np.eye(2) - lin, maps[:, 0, 4:6][..., None])[..., 0]  # (I, 2)
    x = np.repeat(start[:, :1], chains, axis=1).astype(np.float32)  # (I, chains)
    y = np.repeat(start[:, 1:], chains, axis=1).astype(np.float32)
    base = (np.arange(count) * n)[:, None]
    xs = np.empty((count, steps, chains), np.float32)
    ys = np.empty((count, steps, chains), np.float32)
    ks = np.empty((count, steps, chains), np.int8)
    u = rng.random((steps, count, chains), dtype=np.float32)
    for step in range(steps):
        k = np.zeros((count, chains), np.int64)  # the map each walk takes: how many thresholds u passed
        for j in range(n - 1):
            k += u[step] > cum[:, j:j + 1]
        i = base + k
        x, y = (np.take(a, i) * x + np.take(b, i) * y + np.take(e, i),
                np.take(c, i) * x + np.take(d, i) * y + np.take(f, i))
        xs[:, step], ys[:, step], ks[:, step] = x, y, k
    pts = np.stack([xs.reshape(count, -1), ys.reshape(count, -1)], axis=-1)
    return pts, ks.reshape(count, -1)


def _to_pixels(pts: np.ndarray, size: int) -> np.ndarray:
    """Fit the points into a ``size`` square keeping the aspect ratio: integer ``(P, 2)`` pixels."""
    lo = np.array([pts[:, 0].min(), pts[:, 1].min()])
    hi = np.array([pts[:, 0].max(), pts[:, 1].max()])
    span = max(float((hi - lo).max()), 1e-6)
    margin = max(1, size // 16)
    scale = (size - 2 * margin - 1) / span
    offset = margin + ((size - 2 * margin - 1) - (hi - lo) * scale) / 2
    return np.clip(np.round((pts - lo) * scale + offset), 0, size - 1).astype(np.int64)


def _fill_rate(pts: np.ndarray, size: int) -> float:
    pix = _to_pixels(pts, size)
    return len(np.unique(pix[:, 1] * size + pix[:, 0])) / (size * size)


def render_class(rng: np.random.Generator, maps: np.ndarray, count: int, size: int,
                 steps: int) -> list[np.ndarray]:
    """``count`` RGB images ``(size, size, 3)`` uint8 of one class."""
    n = len(maps)
    # Intra-class variation: every parameter weighted by a factor in [0.85, 1.15] ...
    inst = maps[None] * rng.uniform(0.85, 1.15, size=(count, n, 6))
    # ... and pulled back to a contraction where the weighting broke it.
    linear = inst[..., :4].reshape(count, n, 2, 2)
    norm = np.linalg.norm(linear, ord=2, axis=(2, 3))
    inst[..., :4] *= np.minimum(1.0, 0.97 / norm)[..., None]
    palette = rng.uniform(0.35, 1.0, size=(n, 3))  # one colour per map, the class's look
    pts, which = chaos_game(rng, inst, steps)
    flips = rng.random(count) < 0.5
    images = []
    for i in range(count):
        pix = _to_pixels(pts[i], size)
        flat = pix[:, 1] * size + pix[:, 0]
        hits = np.bincount(flat, minlength=size * size).astype(np.float64)
        rgb = np.stack([np.bincount(flat, weights=palette[which[i], ch], minlength=size * size)
                        for ch in range(3)], axis=-1)
        shade = np.where(hits > 0, np.minimum(1.0, 0.5 + np.log1p(hits) / 4), 0.0)  # denser = brighter
        img = (rgb / np.maximum(hits, 1)[:, None] * shade[:, None] * 255).reshape(size, size, 3)
        img = img.astype(np.uint8)
        images.append(img[:, ::-1] if flips[i] else img)
    return images
