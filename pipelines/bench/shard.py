"""``vitscale bench shard``: images/s of the shard stage beside a plain single-process Pillow loop.

Corpus: generated JPEG photos of web-like sizes (shorter side log-normal around 340 px, common aspect
ratios, 10 % portrait, so the median is about 500x350; about a quarter are at most 256 px on the
shorter side and a sixth at least 512), saved at JPEG quality 75..95, with photo-like content
(smooth colour fields, soft shapes, mid-frequency texture, sensor noise).

Measured, on the same corpus and settings (keep_ratio 256, quality 95):
- baseline: one process doing decode -> RGB -> bicubic resize of the shorter side to 256 -> JPEG 95;
- the stage (``run_shard_stage`` on a local Ray, folder source, tars written) with 1 worker, 2
  workers, and all cores; per-core figures divide by the workers used;
- planning a generated 10M-row parquet index in a fresh process: seconds and peak memory.

``--vs img2dataset`` first runs the stage beside img2dataset on loopback URLs (``shard_vs.py``).
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool

import numpy as np

CORPUS_VERSION = 3
SHORT_MEDIAN, SHORT_SIGMA = 345, 0.45
PORTRAIT = 0.08
ASPECTS = [(1.0, 0.05), (4 / 3, 0.35), (3 / 2, 0.40), (16 / 9, 0.20)]


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="vitscale bench shard", description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2400, help="corpus size")
    ap.add_argument("--per-shard", type=int, default=100, help="samples_per_shard for the stage runs")
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "vitscale-bench-shard"),
                    help="where the corpus and outputs go (the corpus is reused between runs)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each measurement; the best counts")
    ap.add_argument("--plan-rows", type=float, default=10e6, help="rows of the planning index (0 = skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vs", choices=["img2dataset"], help="first, the whole stage beside this peer on loopback URLs")
    ap.add_argument("--sizes", type=lambda s: [int(float(x)) for x in s.split(",")], default=[6000, 30000],
                    help="--vs: URL counts, comma-separated")
    ap.add_argument("--distinct", type=int, default=6000, help="--vs: distinct photos behind the URLs")
    ap.add_argument("--img2dataset", help="--vs: img2dataset's command (default: beside this Python, or on PATH)")
    ap.add_argument("--img2dataset-downscale", default="area", choices=["area", "linear"],
                    help="--vs: img2dataset's --downscale_interpolation (area, its default; linear is the "
                         "filter vitscale uses within 2x, for a same-filter comparison)")
    ap.add_argument("--server-protocol", default="HTTP/1.1", choices=["HTTP/1.1", "HTTP/1.0"],
                    help="--vs: what the loopback http.server speaks (HTTP/1.1 keeps connections alive, as "
                         "image hosts do; HTTP/1.0, its default, closes each after one image)")
    return ap.parse_args(argv)


# --------------------------------------------------------------------------- corpus


def photo(rng: np.random.Generator, w: int, h: int):
    """A photo-like RGB picture: smooth colour field with soft-edged shapes, texture, sensor noise.
    Drawn at half size and blurred there, then enlarged; every step is a Pillow C call (cheap)."""
    from PIL import Image, ImageChops, ImageDraw, ImageFilter

    hw, hh = max(2, w // 2), max(2, h // 2)
    base = rng.integers(0, 256, (int(rng.integers(3, 7)), int(rng.integers(3, 7)), 3), dtype=np.uint8)
    im = Image.fromarray(base).resize((hw, hh), Image.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 8))):  # objects with edges
        x0, y0 = int(rng.integers(0, hw)), int(rng.integers(0, hh))
        x1, y1 = x0 + int(rng.integers(hw // 10 + 1, hw // 2 + 2)), y0 + int(rng.integers(hh // 10 + 1, hh // 2 + 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    im = im.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.4, 1.2)))).resize((w, h), Image.BICUBIC)
    texture = rng.normal(128, 20, (max(2, h // 12), max(2, w // 12), 3))
    texture = Image.fromarray(np.clip(texture, 0, 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    im = ImageChops.add(im, texture, 1.0, -128)
    noise = Image.fromarray(np.clip(rng.normal(128, 4, (h, w)), 0, 255).astype(np.uint8)).convert("RGB")
    return ImageChops.add(im, noise, 1.0, -128)


def photo_size(rng: np.random.Generator) -> tuple[int, int]:
    short = int(np.clip(rng.lognormal(np.log(SHORT_MEDIAN), SHORT_SIGMA), 64, 4000))
    aspect = ASPECTS[rng.choice(len(ASPECTS), p=[p for _, p in ASPECTS])][0]
    long_ = int(round(short * aspect))
    return (short, long_) if rng.random() < PORTRAIT else (long_, short)  # most photos are landscape


def _make_one(job: tuple[str, int, int]) -> None:
    path, seed, quality = job
    rng = np.random.default_rng(seed)
    w, h = photo_size(rng)
    photo(rng, w, h).save(path, "JPEG", quality=quality)


def make_corpus(root: str, count: int, seed: int) -> list[str]:
    """``count`` photos in 10 class folders under ``root`` (reused when already made the same way)."""
    marker = os.path.join(root, "corpus.json")
    want = {"version": CORPUS_VERSION, "count": count, "seed": seed}
    paths = [os.path.join(root, f"class{i % 10}", f"{i:06d}.jpg") for i in range(count)]
    if os.path.isfile(marker) and json.load(open(marker)) == want:
        return paths
    shutil.rmtree(root, ignore_errors=True)
    for c in range(10):
        os.makedirs(os.path.join(root, f"class{c}"))
    jobs = [(p, seed * 1_000_003 + i, int(75 + (i * 7) % 21)) for i, p in enumerate(paths)]  # web JPEG 75..95
    with Pool(os.cpu_count()) as pool:
        pool.map(_make_one, jobs, chunksize=16)
    json.dump(want, open(marker, "w"))
    return paths


# --------------------------------------------------------------------------- measurements


def plain_pillow_loop(paths: list[str], size: int = 256, quality: int = 95) -> tuple[float, float]:
    """(images/s, images per CPU-second) of the textbook loop in one process: decode, RGB, bicubic
    resize of the shorter side to ``size``, JPEG encode."""
    from PIL import Image

    t0, cpu0 = time.perf_counter(), time.process_time()
    for path in paths:
        with open(path, "rb") as f:
            im = Image.open(io.BytesIO(f.read())).convert("RGB")
        w, h = im.size
        scale = size / min(w, h)
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
    return len(paths) / (time.perf_counter() - t0), len(paths) / (time.process_time() - cpu0)


def stage_rate(cfg, out: str, workers: int) -> tuple[float, float]:
    """(images/s of the whole stage: planning, tasks, tars, manifest; images per CPU-second of the
    shard tasks) with ``workers`` tasks at a time."""
    from pipelines.config import replace
    from pipelines.shard import run_shard_stage

    shutil.rmtree(out, ignore_errors=True)
    cfg = replace(cfg, **{"shard.max_in_flight": workers})
    t0 = time.perf_counter()
    manifest = run_shard_stage(cfg, out_dir=out)
    seconds = time.perf_counter() - t0
    cpu = sum(json.load(open(p))["cpu_seconds"] for p in glob.glob(os.path.join(out, "*.stats.json")))
    shutil.rmtree(out, ignore_errors=True)
    images = manifest["totals"]["total"]
    return images / seconds, images / cpu


PLAN_SCRIPT = r"""
import json, sys, time
from pipelines.config import load_config
from pipelines.shard import plan_stage, stage_hash

def peak_mb():  # VmHWM: this address space's peak RSS (getrusage's maxrss survives exec from the parent)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

index, out = sys.argv[1], sys.argv[2]
cfg = load_config(None, [f"shard.source={index}", "shard.samples_per_shard=10000", f"workdir={out}"])
before = peak_mb()
t0 = time.perf_counter()
plan, jobs = plan_stage(cfg, out, stage_hash(cfg))
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "rows": plan.num_rows, "shards": len(jobs), "classes": len(plan.label_names),
                  "peak_mb": peak_mb(), "before_mb": before}))
"""


def make_index(path: str, rows: int, classes: int = 1000) -> None:
    """A parquet index of ``rows`` object-store URLs with string labels, written in bounded batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if os.path.isfile(path) and pq.ParquetFile(path).metadata.num_rows == rows:
        return
    schema = pa.schema([("path", pa.string()), ("label", pa.string())])
    batch = 1_000_000
    with pq.ParquetWriter(path + ".tmp", schema, compression="zstd") as w:
        for start in range(0, rows, batch):
            n = min(batch, rows - start)
            ids = np.arange(start, start + n)
            paths = pa.array(np.char.add("s3://bucket/images/", np.char.zfill(ids.astype(str), 10)).astype(object) + ".jpg")
            labels = pa.array(np.char.add("n", np.char.zfill((ids * 7919 % classes).astype(str), 8)).astype(object))
            w.write_table(pa.table({"path": paths, "label": labels}, schema=schema), row_group_size=100_000)
    os.replace(path + ".tmp", path)


def planning(root: str, rows: int) -> dict:
    """Plan a ``rows``-row parquet index in a fresh process; its peak RSS is the driver's planning memory."""
    os.makedirs(root, exist_ok=True)
    index = os.path.join(root, f"index_{rows}.parquet")
    make_index(index, rows)
    out = os.path.join(root, "plan_out")
    shutil.rmtree(out, ignore_errors=True)
    res = subprocess.run([sys.executable, "-c", PLAN_SCRIPT, index, out], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"planning run failed:\n{res.stderr}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(args: argparse.Namespace) -> int:
    opts = parse(getattr(args, "rest", None) or [])
    import ray
    from PIL import Image

    from pipelines.config import load_config, replace

    cores = os.cpu_count() or 1
    os.makedirs(opts.dir, exist_ok=True)
    if opts.vs:
        from pipelines.bench.shard_vs import head_to_head

        vs_corpus = os.path.join(opts.dir, "corpus_vs")
        head_to_head(opts, vs_corpus, make_corpus(vs_corpus, opts.distinct, opts.seed))
        print("\nthe second table: the stage beside a plain Pillow loop", flush=True)
    corpus = os.path.join(opts.dir, "corpus")
    t0 = time.perf_counter()
    paths = make_corpus(corpus, opts.images, opts.seed)
    sizes = sorted(Image.open(p).size for p in paths[:: max(1, len(paths) // 500)])
    shorts = np.array([min(s) for s in sizes])
    print(f"corpus: {len(paths)} JPEG photos in {corpus} ({time.perf_counter() - t0:.0f} s); median "
          f"{int(np.median([s[0] for s in sizes]))}x{int(np.median([s[1] for s in sizes]))}, "
          f"shorter side <= 256: {np.mean(shorts <= 256):.0%}, >= 512: {np.mean(shorts >= 512):.0%}", flush=True)

    cfg = load_config(None, [f"workdir={os.path.join(opts.dir, 'wd')}", f"shard.source={corpus}",
                             f"shard.samples_per_shard={opts.per_shard}", "shard.image_size=256",
                             "shard.resize_mode=keep_ratio", "shard.quality=95", "shard.download.threads=4"])
    ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
    workers = sorted({1, min(2, cores), cores})
    warm_corpus = os.path.join(opts.dir, "warm_corpus")  # a small run first: workers start and import
    make_corpus(warm_corpus, 20 * cores, seed=opts.seed + 1)
    warm = replace(cfg, **{"shard.source": warm_corpus, "shard.samples_per_shard": 10})
    stage_rate(warm, os.path.join(opts.dir, "warm"), cores)

    plain, stage = [], {w: [] for w in workers}
    load = [os.getloadavg()[0]]
    for _ in range(opts.repeats):  # interleaved, so a busy spell on the machine hits both sides
        plain.append(plain_pillow_loop(paths))
        for w in workers:
            stage[w].append(stage_rate(cfg, os.path.join(opts.dir, "out"), w))
    load.append(os.getloadavg()[0])
    ray.shutdown()
    base, base_cpu = max(r for r, _ in plain), max(c for _, c in plain)
    best = {w: max(r for r, _ in runs) for w, runs in stage.items()}
    best_cpu = {w: max(c for _, c in runs) for w, runs in stage.items()}

    print(f"\nshard stage vs a plain Pillow loop: keep_ratio 256, quality 95, {cores} cores, best of "
          f"{opts.repeats}; load average {load[0]:.1f} before, {load[1]:.1f} after")
    print(f"{'':32s}{'images/s':>10s}{'per core':>10s}{'per CPU-s':>11s}")
    print(f"{'plain Pillow loop, 1 process':32s}{base:10.1f}{base:10.1f}{base_cpu:11.1f}")
    for w in workers:
        name = f"stage, {w} worker" + ("s" if w > 1 else "")
        print(f"{name:32s}{best[w]:10.1f}{best[w] / w:10.1f}{best_cpu[w]:11.1f}")
    per_core = best[cores] / cores
    print(f"stage per core / plain loop: {per_core / base:.2f}x wall-clock, "
          f"{best_cpu[cores] / base_cpu:.2f}x per CPU-second (target >= 1.3x)")
    if 2 in best:
        print(f"scaling 1 -> 2 workers: {best[2] / (2 * best[1]):.0%} of linear (target >= 90 %)")
    if opts.plan_rows:
        p = planning(opts.dir, int(opts.plan_rows))
        print(f"planning a {p['rows']:,}-row parquet index ({p['classes']} string labels, {p['shards']} shards): "
              f"{p['seconds']:.1f} s, peak driver memory {p['peak_mb']:.0f} MB "
              f"(after imports {p['before_mb']:.0f} MB; target <= 1024 MB)")
        from pipelines.bench.shard_plan import figures

        print("\n".join(figures(opts.dir, int(opts.plan_rows), baseline=False)), flush=True)
    return 0

