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

With ``--s3`` the comparison is ours against ours: the same shards read from local disk and streamed from
object storage, in alternating rounds of one run. ``--s3`` alone puts them on a moto S3 server started
for the run on a free loopback port (``AWS_ENDPOINT_URL`` points there meanwhile); ``--s3 s3://BUCKET/PREFIX``
puts them under a new folder there instead (endpoint and credentials from the usual ``AWS_*``), removed
afterwards. Loopback S3 measures the client's cost of streaming (HTTP, the retry layer, buffering), not
a network.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from pipelines.bench.moto import start_moto
from pipelines.config import AugmentConfig
from pretrain import storage
from pretrain.data import make_train_loader
from pretrain.errors import InputError

CLASSES = 10
LOOPBACK_BUCKET = "vitscale-bench"


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


def ours(urls: list[str], opts: argparse.Namespace, seed: int) -> float:
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def loopback_s3() -> Iterator[str]:
    """moto's S3 server from this environment on a free 127.0.0.1 port, with ``AWS_*`` pointing at it
    (and no profile or S3-specific endpoint overriding that) until the block ends; yields the endpoint."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": None, "AWS_PROFILE": None,
           "AWS_SESSION_TOKEN": None}
    saved = {k: os.environ.get(k) for k in env}
    try:
        proc = start_moto(port)
    except InputError as e:
        raise InputError(f"bench loader --s3: {e}, or give your own store: --s3 s3://BUCKET/PREFIX") from None
    try:
        _set_env(env)
        yield endpoint
    finally:
        _set_env(saved)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _set_env(values: dict) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@contextlib.contextmanager
def shards_on_s3(shards: list[str], prefix: str) -> Iterator[tuple[list[str], str]]:
    """``shards`` uploaded to a new folder under ``prefix``, or under a loopback S3 server's bucket when
    ``prefix`` is empty; yields (their URLs, where they are in words). The folder is removed afterwards."""
    with contextlib.ExitStack() as stack:
        if prefix:
            where = f"{prefix} ({os.environ.get('AWS_ENDPOINT_URL', 'AWS')})"
        else:
            endpoint = stack.enter_context(loopback_s3())
            prefix, where = f"s3://{LOOPBACK_BUCKET}", f"moto S3 on {endpoint} (loopback)"
            fs, _ = storage.filesystem(prefix)
            fs.mkdir(LOOPBACK_BUCKET)
        folder = storage.join(prefix, f"bench-loader-{uuid.uuid4().hex[:8]}")
        urls = [storage.join(folder, storage.basename(p)) for p in shards]
        storage.upload_many(zip(shards, urls))
        stack.callback(storage.remove, folder, recursive=True)
        yield urls, where


def measure(runners: dict[str, Callable[..., float]], opts: argparse.Namespace) -> dict[str, float]:
    """Median images/s per core of each runner, in the runners' order; rounds alternate the order of
    running so that load from other processes hits all alike."""
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(opts.rounds):
        for name in (list(runners) if r % 2 == 0 else list(reversed(runners))):
            rates[name].append(runners[name](opts, seed=r))
    return {name: statistics.median(values) / max(1, opts.workers) for name, values in rates.items()}


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
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the rates to PATH (JSON)")
    ap.add_argument("--s3", nargs="?", const="", default=None, metavar="s3://BUCKET/PREFIX",
                    help="compare the shards on local disk with the same shards streamed from S3: a loopback "
                         "moto server started for the run, or under PREFIX on the store AWS_* points at")
    opts = ap.parse_args(rest)
    if opts.s3 and not opts.s3.startswith("s3://"):
        ap.error(f"--s3: expected s3://BUCKET/PREFIX, got {opts.s3!r}")
    return opts


def main(args: argparse.Namespace) -> int:
    opts = parse(list(getattr(args, "rest", []) or []))
    torch.set_num_threads(1)  # per core: one thread in this process (loader workers use one each anyway)
    with tempfile.TemporaryDirectory(dir=opts.dir) as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        images = write_dataset(root, opts.images, opts.short_side)
        pil, tv = decoder_rates(images[:256])
        shards = sorted(str(p) for p in (root / "shards").glob("*.tar"))
        if opts.s3 is None:
            runners = {"ours (WebDataset shards)": partial(ours, shards),
                       "baseline (ImageFolder+DataLoader)": partial(baseline, root)}
            short, target = ("ours", "the baseline"), 1.5
        else:
            s3_urls, where = stack.enter_context(shards_on_s3(shards, opts.s3))
            runners = {"ours, shards on S3 (streamed)": partial(ours, s3_urls),
                       "ours, shards on local disk": partial(ours, shards)}
            short, target = ("shards on S3", "local shards"), 0.9
        rates = measure(runners, opts)
    (_, rate_a), (_, rate_b) = rates.items()
    mean_kb = sum(map(len, images)) / len(images) / 1024
    print(f"vitscale bench loader: {opts.images} JPEGs, shorter side {opts.short_side}, {mean_kb:.0f} KiB mean; "
          f"decode + random resized crop {opts.img_size} + flip + normalise, batch {opts.batch}; "
          f"{'in-process, 1 thread' if opts.workers == 0 else f'{opts.workers} loader workers'}; "
          f"median of {opts.rounds} rounds x {opts.batches} batches")
    if opts.s3 is not None:
        print(f"object storage: {where}")
    print(f"{'':34s}{'images/s per core':>20s}")
    for name, rate in rates.items():
        print(f"{name:34s}{rate:20.0f}")
    print(f"{'ratio':34s}{rate_a / rate_b:19.2f}x   (target >= {target}x)")
    print(f"decode only, per core: Pillow {pil:.0f}/s, torchvision.io.decode_jpeg {tv:.0f}/s "
          f"({tv / pil:.2f}x)")
    if opts.json:
        Path(opts.json).write_text(json.dumps({"images_per_s_per_core": dict(rates), "decode_pillow": pil,
                                               "decode_torchvision": tv, "cpu_count": os.cpu_count()}, indent=1))
    need = opts.node_rate / opts.gpus_per_node
    print(f"a {opts.gpus_per_node}-GPU ViT-B/16 node at {opts.node_rate:,.0f} images/s needs {need:,.0f} per GPU: "
          f"{need / rate_a:.1f} cores per GPU with {short[0]}, {need / rate_b:.1f} with {short[1]}")
    return 0


if __name__ == "__main__":  # infra/bench-gpu.sh runs it without the rest of the command's packages
    import sys

    sys.exit(main(argparse.Namespace(rest=sys.argv[1:])))
