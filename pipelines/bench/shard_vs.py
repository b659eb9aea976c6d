"""``vitscale bench shard --vs img2dataset``: the shard stage beside img2dataset, end to end, on the same URLs.

Both tools get the same thing a user would give them: a CSV of ``url,label`` rows pointing at the
benchmark's photo corpus, served by ``python -m http.server --protocol HTTP/1.1`` on 127.0.0.1 (kept-alive
connections, as image hosts and CDNs give; ``--server-protocol HTTP/1.0`` for http.server's default, a
connection per image), and the same settings
(keep_ratio 256 without upscaling, JPEG quality 95, 1,000 samples per shard, WebDataset tars).
Each is run as its own command (``vitscale shard`` and img2dataset's CLI with one process per core x 16
threads), so imports, start-up and the last shard's tail count on both sides; the runs alternate
(ours, theirs, ours, theirs) so that a busy spell on the machine hits both, and the best of each
counts. img2dataset pins webdataset < 0.3, so it may live in its own virtual environment
(``--img2dataset PATH`` to its command).

The resize filters differ by default: img2dataset downscales with area averaging, the stage with
bilinear once DCT scaling has brought a JPEG within 2x (area beyond). ``--img2dataset-downscale
linear`` gives img2dataset the stage's filter, for a same-filter comparison.

Quality: every image the stage resized is compared with the Pillow path it took before (draft
decoding, Pillow's bicubic, JPEG 95), as one PSNR over all their pixels.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from typing import Optional

import numpy as np

RATE_LINE = re.compile(r"shard: \d+/\d+ shards, \d+ images ok, \d+ failed, (\d+) images/s")


def img2dataset_command(given: Optional[str]) -> list[str]:
    """img2dataset's CLI: ``given``, else beside this Python, else on PATH."""
    for candidate in (given, os.path.join(os.path.dirname(sys.executable), "img2dataset"), shutil.which("img2dataset")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return [candidate]
    raise SystemExit("vitscale bench shard --vs img2dataset: img2dataset not found; pip install 'vitscale[bench]' "
                     "(or into its own environment, then --img2dataset PATH/TO/bin/img2dataset)")


class Server:
    """``python -m http.server`` on 127.0.0.1 over ``root``, quiet (its per-request log goes nowhere),
    speaking ``protocol``: HTTP/1.1 keeps a connection open for the client's next request, as image
    hosts and CDNs do; HTTP/1.0 (http.server's default) closes each one after its response."""

    def __init__(self, root: str, protocol: str = "HTTP/1.1"):
        self.proc = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
                                      "--directory", root, "--protocol", protocol], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()  # "Serving HTTP on 127.0.0.1 port N (http://127.0.0.1:N/) ..."
        match = re.search(r"port (\d+)", line)
        if not match:
            self.close()
            raise RuntimeError(f"http.server did not start: {line!r}")
        self.url = f"http://127.0.0.1:{match.group(1)}"

    def cpu_seconds(self) -> float:
        """CPU the server has used so far (user + system): it shares the cores with the tool it serves."""
        fields = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def url_list(path: str, server: str, corpus: list[str], root: str, count: int) -> str:
    """``count`` rows of ``url,label``; past the corpus's size the same files come back under new URLs
    (a query the server ignores), so no two rows share a URL."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "label"])
        for i in range(count):
            rel = os.path.relpath(corpus[i % len(corpus)], root)
            w.writerow([f"{server}/{rel}" + (f"?n={i}" if i >= len(corpus) else ""), rel.split(os.sep)[0]])
    return path


def run_vitscale(index: str, out: str, workdir: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(workdir, ignore_errors=True)
    cmd = [os.path.join(os.path.dirname(sys.executable), "vitscale"), "shard", "--source", index, "--out", out,
           "--set", f"workdir={workdir}", "--set", "shard.path_column=url", "--set", "shard.samples_per_shard=1000",
           "--set", "shard.image_size=256", "--set", "shard.resize_mode=keep_ratio", "--set", "shard.quality=95",
           "--set", "shard.download.allow_private=true"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ""})
    seconds = time.perf_counter() - t0
    if res.returncode:
        raise RuntimeError(f"vitscale shard failed ({res.returncode}):\n{res.stderr[-3000:]}")
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    stats = [json.load(open(p)) for p in glob.glob(os.path.join(out, "*.stats.json"))]
    rates = RATE_LINE.findall(res.stderr)
    return {"seconds": seconds, "ok": manifest["totals"]["ok"], "total": manifest["totals"]["total"],
            "stage_rate": float(rates[-1]) if rates else None,
            "cpu_per_image": sum(s["cpu_seconds"] for s in stats) / max(1, sum(s["total"] for s in stats))}


def run_img2dataset(command: list[str], index: str, out: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = command + [f"--url_list={index}", "--input_format=csv", "--url_col=url", "--save_additional_columns=[label]",
                     f"--output_folder={out}", "--output_format=webdataset", f"--processes_count={os.cpu_count() or 1}",
                     "--thread_count=16", "--image_size=256", "--resize_mode=keep_ratio",
                     "--resize_only_if_bigger=True", "--encode_quality=95", "--number_sample_per_shard=1000",
                     "--enable_wandb=False"]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if res.returncode:
        raise RuntimeError(f"img2dataset failed ({res.returncode}):\n{res.stderr[-3000:]}")
    stats = [json.load(open(p)) for p in glob.glob(os.path.join(out, "*_stats.json"))]
    return {"seconds": seconds, "ok": sum(s["successes"] for s in stats), "total": sum(s["count"] for s in stats)}


def _jpegs(out: str) -> dict[str, bytes]:
    """``source -> stored JPEG`` of a vitscale output folder."""
    found = {}
    for path in sorted(glob.glob(os.path.join(out, "*.tar"))):
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        for name, data in members.items():
            if name.endswith(".json"):
                found[json.loads(data)["source"]] = members[name[:-5] + ".jpg"]
    return found


def psnr_vs_pillow(out: str, root: str, size: int = 256, quality: int = 95) -> tuple[float, int]:
    """(PSNR in dB over all pixels, images compared) of the images the stage resized against the Pillow
    path it took before: draft decoding (DCT scaling by 1/2, 1/4, 1/8), Pillow's antialiased bicubic
    (the old torch resize matched it within 2 grey levels), JPEG 95. Images kept as they were are the
    same bytes on both sides and left out, so they do not inflate the figure."""
    from PIL import Image

    err, count, n = 0.0, 0, 0
    for url, data in _jpegs(out).items():
        rel = url.split("/", 3)[3].split("?", 1)[0]
        with Image.open(os.path.join(root, rel)) as im:
            w, h = im.size
            if min(w, h) <= size:
                continue
            k = size / min(w, h)
            out_size = (max(1, round(w * k)), max(1, round(h * k)))
            im.draft("RGB", (math.ceil(w * k), math.ceil(h * k)))
            buf = io.BytesIO()
            im.convert("RGB").resize(out_size, Image.BICUBIC).save(buf, "JPEG", quality=quality)
        ref = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float64)
        ours = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)
        if ours.shape != ref.shape:
            raise RuntimeError(f"{url}: stage gave {ours.shape}, the Pillow path {ref.shape}")
        err += float(((ours - ref) ** 2).sum())
        count += ref.size
        n += 1
    mse = err / max(1, count)
    return (float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)), n


def head_to_head(opts, corpus_root: str, paths: list[str]) -> None:
    """Run both tools at each size of ``opts.sizes``, alternating, and print the table."""
    command = img2dataset_command(opts.img2dataset) + [f"--downscale_interpolation={opts.img2dataset_downscale}"]
    cores = os.cpu_count() or 1
    server = Server(corpus_root, opts.server_protocol)
    rows = []
    try:
        tiny = url_list(os.path.join(opts.dir, "urls_10.csv"), server.url, paths, corpus_root, 10)
        startup = min(run_vitscale(tiny, os.path.join(opts.dir, "vs_ours"), os.path.join(opts.dir, "vs_wd"))["seconds"]
                      for _ in range(opts.repeats))
        print(f"  vitscale shard of 10 URLs (its fixed start-up and end): {startup:.1f} s", flush=True)
        for count in opts.sizes:
            index = url_list(os.path.join(opts.dir, f"urls_{count}.csv"), server.url, paths, corpus_root, count)
            ours, theirs, loads = [], [], [os.getloadavg()[0]]
            for _ in range(opts.repeats):
                served = server.cpu_seconds()
                ours.append(run_vitscale(index, os.path.join(opts.dir, "vs_ours"), os.path.join(opts.dir, "vs_wd")))
                ours[-1]["server_cpu_per_image"] = (server.cpu_seconds() - served) / count
                print(f"  {count} URLs: vitscale {ours[-1]['seconds']:.1f} s ({ours[-1]['ok']} ok)", flush=True)
                theirs.append(run_img2dataset(command, index, os.path.join(opts.dir, "vs_theirs")))
                print(f"  {count} URLs: img2dataset {theirs[-1]['seconds']:.1f} s ({theirs[-1]['ok']} ok)", flush=True)
            loads.append(os.getloadavg()[0])
            rows.append((count, min(ours, key=lambda r: r["seconds"]), min(theirs, key=lambda r: r["seconds"]), loads))
        psnr, compared = psnr_vs_pillow(os.path.join(opts.dir, "vs_ours"), corpus_root)
    finally:
        server.close()
    print(f"\nvitscale shard vs img2dataset ({cores} processes x 16 threads, downscale "
          f"{opts.img2dataset_downscale}; vitscale: bilinear within 2x, area beyond): keep_ratio 256 (no upscaling), quality 95, "
          f"1,000 per shard, webdataset, URLs on 127.0.0.1 (python -m http.server --protocol "
          f"{opts.server_protocol}), {cores} cores, best of "
          f"{opts.repeats}, alternating")
    print(f"{'URLs':>8s}{'vitscale':>22s}{'img2dataset':>22s}{'ratio':>8s}{'ok (ours/theirs)':>20s}"
          f"{'load before/after':>19s}")
    for count, o, t, loads in rows:
        print(f"{count:8d}{o['seconds']:9.1f} s ({o['ok'] / o['seconds']:4.0f} img/s){t['seconds']:9.1f} s "
              f"({t['ok'] / t['seconds']:4.0f} img/s){t['seconds'] / o['seconds']:7.2f}x"
              f"{o['ok']:>11d}/{t['ok']:<8d}{loads[0]:9.1f} / {loads[1]:.1f}")
    print(f"\nfixed cost of a vitscale shard command (10 URLs, end to end, best of {opts.repeats}): {startup:.1f} s "
          f"(target <= 5 s)")
    print("\nstage occupancy (the stage's own images/s per core beside the CPU cost of an image in its tasks):")
    for count, o, _, _ in rows:
        if o["stage_rate"]:
            allowed = 1.0 / o["cpu_per_image"]
            print(f"{count:8d} URLs: {o['stage_rate'] / cores:.0f} img/s per core, {o['cpu_per_image'] * 1e3:.2f} ms "
                  f"CPU per image (allows {allowed:.0f}/core): {o['stage_rate'] / cores / allowed:.0%} (target >= 70 %); "
                  f"the HTTP server took {o['server_cpu_per_image'] * 1e3:.2f} ms CPU per image of the same cores")
    print(f"image quality: PSNR {psnr:.1f} dB over the {compared} images the stage resized in its last run, "
          f"against the old Pillow path (draft, bicubic; target >= 40 dB)", flush=True)
