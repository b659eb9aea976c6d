"""``vitscale plan``: what a pretraining run will cost before any GPU is rented.

Every figure comes from the config, the cluster shape and a few rates. Each rate is either measured
(a benchmark result file), given on the command line, or an assumption, and the plan says which.

Formulas:
- train FLOPs per image = 2 x MACs x 3 (forward + backward), + 1 forward with activation checkpointing
- images/s = GPUs x peak x MFU / train FLOPs per image
- model states per GPU (ZeRO paper, Rajbhandari et al. 2020, mixed-precision Adam): stage 0 16P,
  1 4P + 12P/N, 2 2P + 14P/N, 3 16P/N bytes, N = data-parallel ranks
- activations per block, 16-bit, fused (SDPA) attention, no dropout: tokens x micro-batch x (18 x width
  + 4 x mlp) bytes: LayerNorm inputs, qkv in/out, attention output and its copy, fc1 in/out, GELU out
  (Korthikanti et al. 2022, without the attention-score terms that flash attention does not store).
  Checked on an H200 (torch 2.11, bf16 weights): after the forward pass autograd held 0.95x this
  figure for ViT-L/16 and B/16, so the estimate errs a little high.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

from pipelines.config import Config
from pretrain.metrics import hardware_flops_per_image, model_flops_per_image
from pretrain.errors import InputError

# Dense tensor-core peaks per GPU in TFLOP/s (vendor data sheets: SXM parts, no sparsity).
PEAK_TFLOPS = {
    "h100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},  # fp32 runs as TF32
    "h200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},
    "a100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
}
GPU_MEMORY_BYTES = {"h100": 80e9, "h200": 141e9, "a100": 80e9}
ASSUMED_MFU = 0.40
# Decode a ~256-px JPEG, random-resized-crop to 224, flip, normalise: one core's rate, an assumption
# until `vitscale bench loader` has written a measurement.
ASSUMED_LOADER_RATE = 400.0
ASSUMED_CLASSES = 1000
# JPEG size of natural photos by quality, bits per pixel (assumed; photos of sklearn's samples at
# 256 px gave 2.5 to 3.9 at q95).
JPEG_BITS_PER_PIXEL = {75: 1.2, 85: 1.6, 90: 2.0, 95: 3.0, 100: 6.0}
ASSUMED_ASPECT = 4 / 3  # keep_ratio resizes the shorter side; photos are mostly 4:3
# A sample in a tar: three 512-byte headers, .cls and .json padded to 512 each, half a block of
# padding after the JPEG on average.
TAR_BYTES_PER_SAMPLE = 3 * 512 + 512 + 512 + 256
MEASURED_DIR_ENV = "VITSCALE_MEASURED"  # where benchmark result files are looked for
DEFAULT_MEASURED_DIR = "runs/measured"


def model_state_bytes(params: int, ranks: int, stage: int, precision: str) -> float:
    """Bytes of parameters, gradients and Adam states per GPU under ZeRO ``stage``."""
    p, n = float(params), float(ranks)
    if precision == "fp32":  # no separate master copy: 4 (param) + 4 (grad) + 8 (Adam m, v)
        return {0: 16 * p, 1: 8 * p + 8 * p / n, 2: 4 * p + 12 * p / n, 3: 16 * p / n}[stage]
    return {0: 16 * p, 1: 4 * p + 12 * p / n, 2: 2 * p + 14 * p / n, 3: 16 * p / n}[stage]


def activation_bytes(tokens: int, micro_batch: int, width: int, mlp: int, depth: int,
                     checkpoint: bool, precision: str) -> float:
    """Activations autograd keeps for one micro-batch (see the module docstring)."""
    scale = 2.0 if precision == "fp32" else 1.0
    per_block = tokens * micro_batch * (18 * width + 4 * mlp) * scale
    if checkpoint:  # block inputs only, plus one block recomputed at a time during backward
        return depth * tokens * micro_batch * 2 * width * scale + per_block
    return depth * per_block


def jpeg_bytes(image_size: int, quality: int, resize_mode: str) -> float:
    """Assumed JPEG bytes of one image whose shorter side is ``image_size``."""
    points = sorted(JPEG_BITS_PER_PIXEL.items())
    q = min(max(quality, points[0][0]), points[-1][0])
    for (q0, b0), (q1, b1) in zip(points, points[1:]):
        if q0 <= q <= q1:
            bpp = b0 + (b1 - b0) * (q - q0) / (q1 - q0)
            break
    pixels = image_size * image_size * (1.0 if resize_mode == "center_crop" else ASSUMED_ASPECT)
    return pixels * bpp / 8


def _model(cfg: Config):
    """The ViT config and model of ``cfg`` (on the meta device: shapes only, no memory)."""
    import torch

    from pretrain.model import ViT, ViTConfig

    m = cfg.model
    classes = cfg.pretrain.num_classes or ASSUMED_CLASSES
    vcfg = ViTConfig.from_variant(m.variant, num_classes=classes, img_size=m.img_size, pool=m.pool,
                                  representation_size=m.representation_size,
                                  act_checkpoint=m.act_checkpoint)
    with torch.device("meta"):
        model = ViT(vcfg)
    return vcfg, model


def make_plan(cfg: Config, images: int, nodes: int, gpus_per_node: int, gpu: str, mfu: Optional[float],
              epochs: float, loader_rate: Optional[float] = None, *, mfu_source: str = "given",
              loader_source: str = "measured") -> dict:
    """The plan's numbers. ``mfu`` / ``loader_rate`` None = the assumed figures, labelled "assumed"."""
    from pretrain.model import macs_per_image, num_params

    gpu = gpu.lower()
    if gpu not in PEAK_TFLOPS:
        raise InputError(f"--gpu {gpu}: unknown (known: {', '.join(PEAK_TFLOPS)})")
    for name, value in (("--images", images), ("--nodes", nodes), ("--gpus-per-node", gpus_per_node)):
        if value < 1:
            raise InputError(f"{name}: must be >= 1, got {value}")
    if epochs <= 0:
        raise InputError(f"--epochs: must be > 0, got {epochs}")
    if mfu is not None and not 0 < mfu <= 1:
        raise InputError(f"--mfu: a fraction in (0, 1], got {mfu}")
    if loader_rate is not None and loader_rate <= 0:
        raise InputError(f"loader rate: must be > 0 images/s per core, got {loader_rate}")

    p, s = cfg.pretrain, cfg.shard
    vcfg, model = _model(cfg)
    params = num_params(model)
    macs = macs_per_image(vcfg)
    flops_per_image = model_flops_per_image(vcfg)  # MFU counts model FLOPs: the recomputation is not work done
    hardware_flops = hardware_flops_per_image(vcfg, vcfg.act_checkpoint)
    gpus = nodes * gpus_per_node
    peak = p.peak_tflops or PEAK_TFLOPS[gpu][p.precision]
    if mfu is None:
        mfu, mfu_source = ASSUMED_MFU, "assumed"
    if loader_rate is None:
        loader_rate, loader_source = ASSUMED_LOADER_RATE, "assumed"

    images_per_s = gpus * peak * 1e12 * mfu / flops_per_image
    seconds_per_epoch = images / images_per_s
    total_hours = seconds_per_epoch * epochs / 3600
    cores = images_per_s / loader_rate
    bytes_per_image = jpeg_bytes(s.image_size, s.quality, s.resize_mode) + TAR_BYTES_PER_SAMPLE
    states = {k: model_state_bytes(params, gpus, k, p.precision) for k in range(4)}
    acts = activation_bytes(vcfg.num_tokens, p.micro_batch, vcfg.width, vcfg.mlp, vcfg.depth,
                            vcfg.act_checkpoint, p.precision)
    memory = states[p.zero_stage] + acts
    accum = p.global_batch / (p.micro_batch * gpus)

    warnings = []
    if p.workers != gpus:
        warnings.append(f"pretrain.workers is {p.workers} but the cluster has {gpus} GPUs: "
                        f"run with --set pretrain.workers={gpus}")
    if not accum.is_integer() or accum < 1:
        warnings.append(f"pretrain.global_batch {p.global_batch} is not micro_batch {p.micro_batch} x "
                        f"{gpus} GPUs x an integer accumulation")
    if memory > GPU_MEMORY_BYTES[gpu]:
        warnings.append(f"{memory / 1e9:.0f} GB per GPU does not fit in {GPU_MEMORY_BYTES[gpu] / 1e9:.0f} GB: "
                        "raise pretrain.zero_stage, lower pretrain.micro_batch or set model.act_checkpoint")
    if not p.use_gpu:
        warnings.append("pretrain.use_gpu is false: the run would not use the GPUs")
    return {
        "variant": cfg.model.variant, "img_size": vcfg.img_size, "tokens": vcfg.num_tokens,
        "num_classes": vcfg.num_classes,
        "classes_source": "config" if p.num_classes else "assumed",
        "params": params, "macs_per_image": macs, "train_flops_per_image": flops_per_image,
        "hardware_flops_per_image": hardware_flops,
        "act_checkpoint": vcfg.act_checkpoint, "precision": p.precision,
        "gpu": gpu, "nodes": nodes, "gpus_per_node": gpus_per_node, "gpus": gpus,
        "peak_tflops": peak, "peak_source": "config" if p.peak_tflops else "data sheet",
        "mfu": mfu, "mfu_source": mfu_source,
        "images": images, "epochs": epochs, "images_per_s": images_per_s,
        "seconds_per_epoch": seconds_per_epoch, "total_hours": total_hours, "gpu_hours": total_hours * gpus,
        "global_batch": p.global_batch, "micro_batch": p.micro_batch, "grad_accum": accum,
        "steps_per_epoch": images / p.global_batch,
        "config_steps": p.steps, "config_epochs": p.steps * p.global_batch / images,
        "config_hours": p.steps * p.global_batch / images_per_s / 3600,
        "loader_rate_per_core": loader_rate, "loader_source": loader_source,
        "cpu_cores": cores, "cpu_cores_per_node": cores / nodes, "cpu_cores_per_gpu": cores / gpus,
        "samples_per_shard": s.samples_per_shard, "shards": math.ceil(images / s.samples_per_shard),
        "bytes_per_image": bytes_per_image, "bytes_source": "assumed",
        "storage_bytes": images * bytes_per_image,
        "read_bytes_per_s": images_per_s * bytes_per_image,
        "read_bytes_per_s_per_node": images_per_s * bytes_per_image / nodes,
        "zero_stage": p.zero_stage, "model_state_bytes_by_stage": states,
        "model_state_bytes": states[p.zero_stage], "activation_bytes": acts,
        "memory_bytes_per_gpu": memory, "gpu_memory_bytes": GPU_MEMORY_BYTES[gpu],
        "fits": memory <= GPU_MEMORY_BYTES[gpu], "warnings": warnings,
    }


# --------------------------------------------------------------------------- measurements


def measured_dir() -> Path:
    return Path(os.environ.get(MEASURED_DIR_ENV, DEFAULT_MEASURED_DIR))


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a readable benchmark result ({e})") from None


def measured_mfu(variant: str, gpu: str, directory: Path) -> Optional[tuple[float, str]]:
    """MFU from ``train.json`` (a list of {"variant", "gpu", "mfu"} records written by the train
    benchmark) for this variant on this GPU model; the best record wins."""
    path = directory / "train.json"
    records = _read(path)
    if not records:
        return None
    records = records if isinstance(records, list) else [records]
    hits = [r for r in records if r.get("variant") == variant and gpu.lower() in str(r.get("gpu", "")).lower()
            and r.get("mfu")]
    if not hits:
        return None
    best = max(hits, key=lambda r: r["mfu"])
    return float(best["mfu"]), f"measured ({path}, {best['gpu']})"


def measured_loader_rate(directory: Path) -> Optional[tuple[float, str]]:
    """Images/s per core from ``loader.json`` ({"images_per_s_per_core": ...}, the loader benchmark)."""
    path = directory / "loader.json"
    record = _read(path)
    if not record or not record.get("images_per_s_per_core"):
        return None
    return float(record["images_per_s_per_core"]), f"measured ({path})"


def record_mfu(variant: str, gpu: str, mfu: float, directory: Optional[Path] = None, **extra) -> Path:
    """For the train benchmark: keep its MFU for ``variant`` on the GPU model named ``gpu`` (e.g.
    torch.cuda.get_device_name()), replacing an earlier record of the same pair."""
    directory = directory or measured_dir()
    path = directory / "train.json"
    records = _read(path) or []
    records = [r for r in (records if isinstance(records, list) else [records])
               if (r.get("variant"), r.get("gpu")) != (variant, gpu)]
    records.append({"variant": variant, "gpu": gpu, "mfu": float(mfu), **extra})
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1) + "\n")
    return path


def record_loader_rate(images_per_s_per_core: float, directory: Optional[Path] = None, **extra) -> Path:
    """For the loader benchmark: keep its images/s per core for the plan's CPU count."""
    directory = directory or measured_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "loader.json"
    path.write_text(json.dumps({"images_per_s_per_core": float(images_per_s_per_core), **extra}, indent=1) + "\n")
    return path


# --------------------------------------------------------------------------- report


def _si(n: float, unit: str = "") -> str:
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.3g} {prefix}{unit}"
    return f"{n:.3g} {unit}".rstrip()


def _duration(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours:,.1f} h ({hours / 24:,.2f} days)"


def format_plan(plan: dict) -> str:
    """The plan as text for a person to read before spending the budget."""
    p = plan
    stage_rows = "\n".join(
        f"    ZeRO-{k}: {v / 1e9:7.2f} GB{'   <- pretrain.zero_stage' if k == p['zero_stage'] else ''}"
        for k, v in p["model_state_bytes_by_stage"].items())
    lines = [
        f"Capacity plan: ViT-{p['variant']} at {p['img_size']} px, {p['images']:,.0f} images x {p['epochs']:g} epochs "
        f"on {p['nodes']} nodes x {p['gpus_per_node']} {p['gpu'].upper()} = {p['gpus']} GPUs",
        "",
        "Compute",
        f"  model: {p['params'] / 1e6:,.1f} M parameters ({p['num_classes']} classes, {p['classes_source']}), "
        f"{p['macs_per_image'] / 1e9:.2f} GMACs per image forward",
        f"  train FLOPs per image: {p['train_flops_per_image'] / 1e9:.1f} GFLOP (model FLOPs, what MFU counts: "
        f"2 x MACs x 3, forward + backward)"
        + (f"; the GPUs run {p['hardware_flops_per_image'] / 1e9:.1f} with the recomputed forward "
           f"(HFU = 4/3 MFU)" if p["act_checkpoint"] else ""),
        f"  peak {p['peak_tflops']:g} TFLOP/s per GPU ({p['precision']}, {p['peak_source']}); "
        f"MFU {p['mfu']:.0%} ({p['mfu_source']})",
        f"  throughput: {p['images_per_s']:,.0f} images/s ({p['images_per_s'] / p['gpus']:,.0f} per GPU)",
        f"  time per epoch: {_duration(p['seconds_per_epoch'])}; {p['steps_per_epoch']:,.0f} steps of "
        f"{p['global_batch']} (micro-batch {p['micro_batch']} x {p['gpus']} GPUs x {p['grad_accum']:g} accumulation)",
        f"  total: {_duration(p['total_hours'] * 3600)} = {p['gpu_hours']:,.0f} GPU-hours",
        f"  (the config's pretrain.steps, {p['config_steps']:,}, is {p['config_epochs']:.2f} epochs of these "
        f"images: {_duration(p['config_hours'] * 3600)} = {p['config_hours'] * p['gpus']:,.0f} GPU-hours)",
        "",
        "Input pipeline",
        f"  loader: {p['loader_rate_per_core']:,.0f} images/s per core ({p['loader_source']})",
        f"  CPU cores to feed the GPUs: {p['cpu_cores']:,.0f} in all, {p['cpu_cores_per_node']:,.1f} per node, "
        f"{p['cpu_cores_per_gpu']:,.1f} per GPU (set pretrain.loader_workers / cpus_per_worker to match)",
        f"  shards: {p['shards']:,} of {p['samples_per_shard']:,} samples",
        f"  storage: {_si(p['storage_bytes'], 'B')} at {_si(p['bytes_per_image'], 'B')} per sample "
        f"({p['bytes_source']}: JPEG at shard.image_size and shard.quality, plus tar headers)",
        f"  read bandwidth: {_si(p['read_bytes_per_s'], 'B/s')} in all, {_si(p['read_bytes_per_s_per_node'], 'B/s')} per node",
        "",
        f"Memory per GPU (N = {p['gpus']} data-parallel ranks)",
        "  model states (params, grads, Adam):",
        stage_rows,
        f"  activations, micro-batch {p['micro_batch']}, {p['tokens']} tokens"
        f"{', checkpointed' if p['act_checkpoint'] else ''}: {p['activation_bytes'] / 1e9:.2f} GB",
        f"  total: {p['memory_bytes_per_gpu'] / 1e9:.2f} GB of {p['gpu_memory_bytes'] / 1e9:.0f} GB "
        f"({'fits' if p['fits'] else 'DOES NOT FIT'}; plus DeepSpeed buckets and the CUDA context, a few GB)",
    ]
    if p["warnings"]:
        lines += ["", "Warnings"] + [f"  ! {w}" for w in p["warnings"]]
    return "\n".join(lines)


def cli_main(cfg: Config, args) -> int:
    """``vitscale plan CONFIG --images N --nodes N [--gpus-per-node 8] [--gpu h100] [--mfu F] [--epochs E]``."""
    directory = measured_dir()
    mfu, mfu_source = args.mfu, "given (--mfu)"
    if mfu is None:
        mfu, mfu_source = measured_mfu(cfg.model.variant, args.gpu, directory) or (None, "assumed")
    rate, rate_source = measured_loader_rate(directory) or (None, "assumed")
    images = args.images
    if not float(images).is_integer():
        raise InputError(f"--images: a whole number, got {images}")
    plan = make_plan(cfg, int(images), args.nodes, args.gpus_per_node, args.gpu, mfu, args.epochs,
                     rate, mfu_source=mfu_source, loader_source=rate_source)
    print(format_plan(plan))
    return 0
