"""``vitscale bench loader``: training-loader images/s per core, ours beside torchvision's ImageFolder.

Both sides read the same JPEGs (generated, photo-like, shorter side 256, quality 95 like the shard stage):
ours from WebDataset shards through ``pretrain.data.make_train_loader``, the baseline from the same images
as files through ``torchvision.datasets.ImageFolder`` + ``DataLoader``; both do decode, Inception random
resized crop to 224, flip, float conversion and normalisation, in batches of 64. With ``--workers 0``
(the default) each runs in this one process on one thread, so images/s is per core; with ``--workers N``
both use N loader processes and the figure is divided by N. Rounds alternate between the two so that
load from other processes hits both alike. The decoders alone (Pillow, torchvision.io.decode_jpeg) are
timed on the same bytes, since the loader's choice between them rests on that.

It ends with what an 8-GPU ViT-B/16 node needs (about 30,000 images/s at 40 % MFU on H100) in cores per
GPU at the measured per-core rates.
"""
from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from pipelines.config import AugmentConfig
from pretrain.data import make_train_loader

CLASSES = 10


def photo_like(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A JPEG with the mix of smooth regions, edges and fine texture of a photo (no downloads allowed)."""
    coarse = Image.fromarray(rng.integers(0, 255, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8))
    detail = Image.fromarray(rng.integers(0, 255, (height // 4, width // 4, 3), dtype=np.uint8))
    pixels = (0.75 * np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
              + 0.25 * np.asarray(detail.resize((width, height), Image.BILINEAR), dtype=np.float32)
              + rng.normal(0, 4, (height, width, 3)))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def write_dataset(root: Path, n: int, short: int, per_shard: int = 256) -> list[bytes]:
    """The same ``n`` JPEGs as WebDataset shards under root/shards and as files under root/folder/CLASS/."""
    rng = np.random.default_rng(0)
    sides = [(short, short * 4 // 3), (short * 4 // 3, short), (short, short)]  # landscape, portrait, square
    images = [photo_like(rng, *sides[i % 3]) for i in range(n)]
    (root / "shards").mkdir(parents=True)
    for s in range(0, n, per_shard):
        with wds.TarWriter(str(root / "shards" / f"{s // per_shard:06d}.tar")) as tw:
            for i in range(s, min(n, s + per_shard)):
                tw.write({"__key__": f"{i:08d}", "jpg": images[i], "cls": str(i % CLASSES).encode()})
    for i, data in enumerate(images):
        folder = root / "folder" / f"c{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:08d}.jpg").write_bytes(data)
    return images


def decoder_rates(images: list[bytes]) -> tuple[float, float]:
    """Images/s per core of (Pillow, torchvision.io.decode_jpeg), full-size RGB decode only."""
    def pil(data: bytes) -> None:
        Image.open(io.BytesIO(data)).convert("RGB")

    def tv(data: bytes) -> None:
        decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)

    best = {pil: 0.0, tv: 0.0}
    for _ in range(3):
        for fn in best:
            start = time.perf_counter()
            for data in images:
                fn(data)
            best[fn] = max(best[fn], len(images) / (time.perf_counter() - start))
    return best[pil], best[tv]


def _timed(batches, n_batches: int, warmup: int = 2) -> float:
    """Images/s over ``n_batches`` after ``warmup`` batches (worker start-up, first shuffle window)."""
    for _ in range(warmup):
        next(batches)
    start, images = time.perf_counter(), 0
    for _ in range(n_batches):
        images += len(next(batches)[0])
    return images / (time.perf_counter() - start)


def ours(root: Path, opts: argparse.Namespace, seed: int) -> float:
    urls = sorted(str(p) for p in (root / "shards").glob("*.tar"))
    augment = AugmentConfig()  # inception crop (0.08, 1), flip, mean/std 0.5
    loader = make_train_loader(urls, batch_size=opts.batch, rank=0, world_size=1, seed=seed,
                               img_size=opts.img_size, augment=augment, shuffle_buffer=opts.batch * 4,
                               num_workers=opts.workers)
    try:
        return _timed(loader, opts.batches)
    finally:
        loader.close()


def baseline(root: Path, opts: argparse.Namespace, seed: int) -> float:
    augment = AugmentConfig()
    transform = v2.Compose([
        v2.RandomResizedCrop(opts.img_size, scale=augment.crop_scale, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(augment.mean), list(augment.std)),
    ])
    dataset = ImageFolder(str(root / "folder"), transform=transform)
    loader = DataLoader(dataset, batch_size=opts.batch, shuffle=True, num_workers=opts.workers,
                        generator=torch.Generator().manual_seed(seed), drop_last=True)

    def forever():
        while True:
            yield from loader

    return _timed(forever(), opts.batches)


def parse(rest: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="vitscale bench loader", description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1536, help="distinct images written (default 1536)")
    ap.add_argument("--short-side", type=int, default=256, help="stored image size, shorter side (default 256)")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=20, help="timed batches per round (default 20)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0, help="loader processes; 0 = in this process (default)")
    ap.add_argument("--node-rate", type=float, default=30000.0, help="images/s one training node consumes")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--dir", default=None, help="where to write the images (default: a temporary directory)")
    return ap.parse_args(rest)


def main(args: SimpleNamespace) -> int:
    opts = parse(list(getattr(args, "rest", []) or []))
    torch.set_num_threads(1)  # per core: one thread in this process (loader workers use one each anyway)
    with tempfile.TemporaryDirectory(dir=opts.dir) as tmp:
        root = Path(tmp)
        images = write_dataset(root, opts.images, opts.short_side)
        pil, tv = decoder_rates(images[:256])
        rates: dict[str, list[float]] = {"ours": [], "baseline": []}
        for r in range(opts.rounds):
            order = ("ours", "baseline") if r % 2 == 0 else ("baseline", "ours")
            for name in order:
                rates[name].append((ours if name == "ours" else baseline)(root, opts, seed=r))
    per = max(1, opts.workers)
    ours_rate, base_rate = (statistics.median(rates[k]) / per for k in ("ours", "baseline"))
    mean_kb = sum(map(len, images)) / len(images) / 1024
    print(f"vitscale bench loader: {opts.images} JPEGs, shorter side {opts.short_side}, {mean_kb:.0f} KiB mean; "
          f"decode + random resized crop {opts.img_size} + flip + normalise, batch {opts.batch}; "
          f"{'in-process, 1 thread' if opts.workers == 0 else f'{opts.workers} loader workers'}; "
          f"median of {opts.rounds} rounds x {opts.batches} batches")
    print(f"{'':34s}{'images/s per core':>20s}")
    print(f"{'ours (WebDataset shards)':34s}{ours_rate:20.0f}")
    print(f"{'baseline (ImageFolder+DataLoader)':34s}{base_rate:20.0f}")
    print(f"{'ratio':34s}{ours_rate / base_rate:19.2f}x   (target >= 1.5x)")
    print(f"decode only, per core: Pillow {pil:.0f}/s, torchvision.io.decode_jpeg {tv:.0f}/s "
          f"({tv / pil:.2f}x)")
    need = opts.node_rate / opts.gpus_per_node
    print(f"a {opts.gpus_per_node}-GPU ViT-B/16 node at {opts.node_rate:,.0f} images/s needs {need:,.0f} per GPU: "
          f"{need / ours_rate:.1f} cores per GPU with ours, {need / base_rate:.1f} with the baseline")
    return 0
