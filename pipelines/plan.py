"""``vitscale plan``: what a pretraining run will cost before any GPU is rented.

Every figure comes from the config, the cluster shape and a few rates. Each rate is either measured
(a benchmark result file), given on the command line, or an assumption, and the plan says which.

Formulas:
- train FLOPs per image and the peaks: ``pretrain.flops`` (the table MFU is measured against)
- images/s = GPUs x peak x MFU / train FLOPs per image
- model states per GPU (ZeRO paper, Rajbhandari et al. 2020, mixed precision): 2 bytes of parameters,
  2 of gradients and K of optimizer states per parameter (K = 12 for Adam: fp32 master, m, v; 8 for
  SGD with momentum); stage 1 divides K by the N data-parallel ranks, 2 also the gradients, 3 all three
- activations per block, 16-bit, fused (SDPA) attention, no dropout: tokens x micro-batch x (18 x width
  + 4 x mlp) bytes: LayerNorm inputs, qkv in/out, attention output and its copy, fc1 in/out, GELU out
  (Korthikanti et al. 2022, without the attention-score terms that flash attention does not store)
- gradient communication per step, bandwidth term of a ring (latency ignored): all-reduce 2(N-1)/N x S
  bytes through the bus bandwidth; ZeRO 2 reduce-scatters the gradients every micro-batch and
  all-gathers the updated parameters once, (N-1)/N x S each; ZeRO 3 also gathers the parameters for
  every forward and backward (and recomputation). The bus bandwidth across nodes is the node's network
  (GB/s per GPU x GPUs per node, as NCCL runs one ring per NIC rail); inside one node, NVLink.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from pipelines.config import Config
from pretrain.errors import InputError
from pretrain.flops import BY_KEY, hardware_flops_per_image, model_flops_per_image

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
# Below this many tokens per GPU per micro-batch the matmuls are too thin to keep a tensor-core GPU
# busy, and the fixed costs of a step (kernel launches, the optimizer, communication) weigh more; an
# assumption: the measured MFU figures used 128 to 256 images of 197 tokens.
MIN_TOKENS_PER_MICRO_BATCH = 8192
# Optimizer state bytes per parameter beyond the 16-bit parameter and gradient (mixed precision).
OPTIMIZER_STATE_BYTES = {"adam": 12, "sgd": 8}  # fp32 master + m, v / + momentum


@dataclass(frozen=True)
class Fabric:
    """A network between nodes, at line rate: per GPU (one NIC per GPU) or per node (shared)."""

    gbit_per_gpu: Optional[float] = None
    gbit_per_node: Optional[float] = None
    what: str = ""

    def gb_per_s_per_gpu(self, gpus_per_node: int) -> float:
        return (self.gbit_per_gpu or self.gbit_per_node / gpus_per_node) / 8


INTERCONNECTS: dict[str, Fabric] = {
    "ib-ndr": Fabric(gbit_per_gpu=400, what="InfiniBand NDR, a 400 Gb/s HCA per GPU (DGX H100, Azure ND H100 v5)"),
    "ib-hdr": Fabric(gbit_per_gpu=200, what="InfiniBand HDR, a 200 Gb/s HCA per GPU (DGX A100, Azure ND A100 v4)"),
    "roce-400g": Fabric(gbit_per_gpu=400, what="RDMA over 400 Gb/s Ethernet, a NIC per GPU"),
    "efa-p5": Fabric(gbit_per_node=3200, what="AWS p5.48xlarge: 32 EFA interfaces, 3,200 Gb/s per node"),
    "efa-p4d": Fabric(gbit_per_node=400, what="AWS p4d.24xlarge: 4 EFA interfaces, 400 Gb/s per node"),
    "tcp-100g": Fabric(gbit_per_node=100, what="100 Gb/s Ethernet per node, NCCL over TCP sockets"),
    "tcp-25g": Fabric(gbit_per_node=25, what="25 Gb/s Ethernet per node, NCCL over TCP sockets"),
}
ASSUMED_INTERCONNECT = "ib-ndr"


def resolve_interconnect(value: Union[str, float, None], gpus_per_node: int) -> tuple[float, str, bool]:
    """(GB/s per GPU, what it is, given?) for ``--interconnect NAME | GB/s``; None = the assumed fabric."""
    if value is None:
        gb, what, _ = resolve_interconnect(ASSUMED_INTERCONNECT, gpus_per_node)
        return gb, what, False
    name = str(value).strip().lower()
    if name in INTERCONNECTS:
        fabric = INTERCONNECTS[name]
        return fabric.gb_per_s_per_gpu(gpus_per_node), f"{name}: {fabric.what}", True
    try:
        gb = float(name)
    except ValueError:
        gb = float("nan")
    if not gb > 0 or math.isinf(gb):
        raise InputError(f"--interconnect {value}: expected GB/s per GPU (a number > 0) or one of "
                         f"{', '.join(INTERCONNECTS)}")
    return gb, f"{gb:g} GB/s per GPU", True


def model_state_bytes(params: int, ranks: int, stage: int, precision: str, optimizer: str = "adam") -> float:
    """Bytes of parameters, gradients and optimizer states per GPU under ZeRO ``stage``."""
    p, n = float(params), float(ranks)
    if precision == "fp32":  # no separate master copy: 4 (param) + 4 (grad) + the states in fp32
        param, grad, states = 4.0, 4.0, OPTIMIZER_STATE_BYTES[optimizer] - 4.0
    else:
        param, grad, states = 2.0, 2.0, float(OPTIMIZER_STATE_BYTES[optimizer])
    per_param = {0: param + grad + states, 1: param + grad + states / n, 2: param + (grad + states) / n,
                 3: (param + grad + states) / n}[stage]
    return p * per_param


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


def _model(model_cfg, num_classes: int):
    """The ViT config and model (on the meta device: shapes only, no memory) of a ``model`` slice."""
    import torch

    from pretrain.engine import vit_config
    from pretrain.model import ViT

    vcfg = vit_config(model_cfg, num_classes)
    with torch.device("meta"):
        model = ViT(vcfg)
    return vcfg, model


def communication(params: int, gpus: int, nodes: int, gpus_per_node: int, stage: int, precision: str,
                  accum: int, act_checkpoint: bool, net_gb_per_gpu: float, nvlink_gb: float,
                  compute_s: float) -> dict:
    """Seconds of gradient (and, under ZeRO 3, parameter) traffic per optimizer step, and how much of it
    the backward pass can hide (DeepSpeed's ``overlap_comm``: buckets go out while backward goes on)."""
    size = params * (4 if precision == "fp32" else 2)
    share = (gpus - 1) / gpus
    bus_gb = nvlink_gb if nodes == 1 else min(net_gb_per_gpu * gpus_per_node, nvlink_gb)
    one = share * size / (bus_gb * 1e9)  # one reduce-scatter or all-gather of the model
    backward_s = compute_s * (3 / 4 if act_checkpoint else 2 / 3)  # backward (+ recomputation)
    if stage <= 1:  # one all-reduce at the accumulation boundary, behind the last micro-batch's backward
        pattern, comm_s, hideable = "ring all-reduce of the gradients", 2 * one, backward_s / accum
    elif stage == 2:  # a reduce-scatter behind every backward; the all-gather follows the optimizer step
        pattern = "reduce-scatter of the gradients per micro-batch + all-gather of the parameters"
        comm_s, hideable = (accum + 1) * one, min(accum * one, backward_s)
    else:  # parameters gathered for forward, backward (and recomputation), prefetched behind compute
        pattern = "parameter all-gathers + gradient reduce-scatter per micro-batch"
        comm_s, hideable = accum * ((3 if act_checkpoint else 2) + 1) * one, compute_s
    hidden = min(hideable, comm_s)
    return {"comm_pattern": pattern, "bus_gb_per_s": bus_gb, "grad_bytes": size, "comm_s": comm_s,
            "hidden_comm_s": hidden, "exposed_comm_s": comm_s - hidden, "compute_s": compute_s,
            "step_s": compute_s + comm_s - hidden}


def transfer_plan(cfg: Config, gpu: str, peak: float, mfu: float, cluster_gpus: int) -> dict:
    """Memory per GPU and time per fine-tuning cell of the transfer stage (the paper's protocol:
    SGD with momentum, ``transfer.batch`` over ``transfer.workers`` GPUs at ``transfer.img_size``)."""
    from pretrain.downstream import REGISTRY
    from pretrain.model import num_params

    t, p = cfg.transfer, cfg.pretrain
    workers = t.workers
    micro = t.micro_batch if t.micro_batch is not None else t.batch // max(workers, 1)
    warnings = []
    if t.batch % workers:
        warnings.append(f"transfer.batch {t.batch} is not divisible by transfer.workers {workers}")
    elif t.micro_batch is not None and t.batch % (t.micro_batch * workers):
        warnings.append(f"transfer.batch {t.batch} is not transfer.micro_batch {t.micro_batch} x "
                        f"transfer.workers {workers} x an integer accumulation")
    rows = []
    model_cfg = dataclasses.replace(cfg.model, img_size=t.img_size, representation_size=None)
    biggest = max((REGISTRY[d].num_classes for d in t.datasets if d in REGISTRY), default=ASSUMED_CLASSES)
    vcfg, model = _model(model_cfg, biggest)
    params = num_params(model)
    states = model_state_bytes(params, workers, p.zero_stage, p.precision, optimizer="sgd")
    acts = activation_bytes(vcfg.num_tokens, micro, vcfg.width, vcfg.mlp, vcfg.depth, cfg.model.act_checkpoint,
                            p.precision)
    memory = states + acts
    limit = BY_KEY[gpu].memory_gb * 1e9
    if memory > limit:
        warnings.append(f"transfer: {memory / 1e9:.0f} GB per GPU does not fit in {limit / 1e9:.0f} GB: set "
                        f"transfer.micro_batch (gradient accumulation) or raise transfer.workers")
    for name in t.datasets if t.mode == "finetune" else []:
        spec = REGISTRY.get(name)
        steps = t.steps or (spec.steps if spec else 500)  # a folder of images gets 500 steps
        grid = 1 if spec and spec.lr is not None else len(t.lrs)
        cells = (grid + (1 if grid > 1 else 0)) * (2 if t.compare_scratch else 1)  # + the final retrain
        cvcfg = dataclasses.replace(vcfg, num_classes=spec.num_classes if spec else ASSUMED_CLASSES)
        cell_s = steps * t.batch * model_flops_per_image(cvcfg) / (workers * peak * 1e12 * mfu)
        rows.append({"dataset": name, "steps": steps, "cells": cells, "cell_s": cell_s,
                     "gpu_hours": cells * cell_s * workers / 3600, "rounds": 2 if grid > 1 else 1,
                     "steps_source": "config" if t.steps else ("paper" if spec else "assumed")})
    gpu_hours = sum(r["gpu_hours"] for r in rows)
    # Cells run at once as far as the GPUs go; a dataset's final retrain waits for its LR grid.
    wall_s = max([r["cell_s"] * r["rounds"] for r in rows] + [gpu_hours * 3600 / max(cluster_gpus, 1)])
    return {"mode": t.mode, "workers": workers, "micro_batch": micro, "batch": t.batch,
            "grad_accum": t.batch // (micro * workers) if micro and workers else 0,
            "img_size": t.img_size, "tokens": vcfg.num_tokens, "params": params,
            "model_state_bytes": states, "activation_bytes": acts, "memory_bytes_per_gpu": memory,
            "fits": memory <= limit, "rows": rows, "gpu_hours": gpu_hours, "wall_s": wall_s if rows else 0.0,
            "warnings": warnings}


def make_plan(cfg: Config, images: int, nodes: int, gpus_per_node: int, gpu: str, mfu: Optional[float],
              epochs: float, loader_rate: Optional[float] = None, *, mfu_source: str = "given",
              loader_source: str = "measured", interconnect: Union[str, float, None] = None) -> dict:
    """The plan's numbers. ``mfu`` / ``loader_rate`` / ``interconnect`` None = the assumed figures,
    labelled "assumed"."""
    from pretrain.model import macs_per_image, num_params

    gpu = gpu.lower()
    if gpu not in BY_KEY:
        raise InputError(f"--gpu {gpu}: unknown (known: {', '.join(BY_KEY)})")
    for name, value in (("--images", images), ("--nodes", nodes), ("--gpus-per-node", gpus_per_node)):
        if value < 1:
            raise InputError(f"{name}: must be >= 1, got {value}")
    if epochs <= 0:
        raise InputError(f"--epochs: must be > 0, got {epochs}")
    if mfu is not None and not 0 < mfu <= 1:
        raise InputError(f"--mfu: a fraction in (0, 1], got {mfu}")
    if loader_rate is not None and loader_rate <= 0:
        raise InputError(f"loader rate: must be > 0 images/s per core, got {loader_rate}")
    net_gb, net_what, net_given = resolve_interconnect(interconnect, gpus_per_node)

    p, s = cfg.pretrain, cfg.shard
    accel = BY_KEY[gpu]
    vcfg, model = _model(cfg.model, p.num_classes or ASSUMED_CLASSES)
    params = num_params(model)
    macs = macs_per_image(vcfg)
    flops_per_image = model_flops_per_image(vcfg)  # MFU counts model FLOPs: the recomputation is not work done
    hardware_flops = hardware_flops_per_image(vcfg, cfg.model.act_checkpoint)
    gpus = nodes * gpus_per_node
    gpu_memory = accel.memory_gb * 1e9
    peak = p.peak_tflops or accel.peak_tflops(p.precision)
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
                            cfg.model.act_checkpoint, p.precision)
    memory = states[p.zero_stage] + acts
    accum = p.global_batch / (p.micro_batch * gpus)
    per_image_act = activation_bytes(vcfg.num_tokens, 1, vcfg.width, vcfg.mlp, vcfg.depth,
                                     cfg.model.act_checkpoint, p.precision)  # linear in the micro-batch
    max_micro = max(0, int((gpu_memory - states[p.zero_stage]) // per_image_act))

    steps_accum = max(1, round(accum))
    compute_s = steps_accum * p.micro_batch * flops_per_image / (peak * 1e12 * mfu)
    comm = communication(params, gpus, nodes, gpus_per_node, p.zero_stage, p.precision, steps_accum,
                         cfg.model.act_checkpoint, net_gb, accel.nvlink_gbs, compute_s)
    tokens_per_micro = vcfg.num_tokens * p.micro_batch
    transfer = transfer_plan(cfg, gpu, peak, mfu, gpus)

    warnings = []
    if p.workers != gpus:
        warnings.append(f"pretrain.workers is {p.workers} but the cluster has {gpus} GPUs: "
                        f"run with --set pretrain.workers={gpus}")
    if not accum.is_integer() or accum < 1:
        warnings.append(f"pretrain.global_batch {p.global_batch} is not micro_batch {p.micro_batch} x "
                        f"{gpus} GPUs x an integer accumulation")
    if memory > gpu_memory:
        warnings.append(f"{memory / 1e9:.0f} GB per GPU does not fit in {gpu_memory / 1e9:.0f} GB: "
                        "raise pretrain.zero_stage, lower pretrain.micro_batch or set model.act_checkpoint")
    if comm["comm_s"] >= comm["compute_s"]:
        warnings.append(
            f"communication dominates: {comm['comm_s'] * 1e3:,.0f} ms of gradient traffic per step against "
            f"{comm['compute_s'] * 1e3:,.0f} ms of compute over {net_what.split(':')[0]}; no overlap hides "
            f"that. Use a faster fabric (--interconnect ib-ndr / efa-p5; infra/README.md says how), or fewer GPUs: "
            f"the traffic per step stays the same while each GPU computes more of the batch")
    elif comm["exposed_comm_s"] > 0.2 * comm["step_s"]:
        warnings.append(f"exposed communication is {comm['exposed_comm_s'] / comm['step_s']:.0%} of each step "
                        f"({comm['exposed_comm_s'] * 1e3:,.0f} ms after overlap)")
    if tokens_per_micro < MIN_TOKENS_PER_MICRO_BATCH:
        need = math.ceil(MIN_TOKENS_PER_MICRO_BATCH / vcfg.num_tokens)
        # the most GPUs that still give each one `need` images or more, with no accumulation
        fewer = next((g for g in range(min(gpus, p.global_batch // need), 0, -1)
                      if p.global_batch % g == 0 and p.global_batch // g <= max_micro), None)
        advice = (f"or run on {fewer} GPUs at pretrain.micro_batch={p.global_batch // fewer}" if fewer
                  else "or raise pretrain.global_batch")
        warnings.append(
            f"micro-batch {p.micro_batch} ({tokens_per_micro:,} tokens per GPU per pass) is too small for good "
            f"MFU (assumed: at least {MIN_TOKENS_PER_MICRO_BATCH:,} tokens, {need} images); global batch "
            f"{p.global_batch} over {gpus} GPUs leaves each GPU {p.global_batch // gpus}. The assumed MFU will "
            f"likely not hold: measure it (vitscale bench train --gpu --cases {cfg.model.variant}:{p.micro_batch}), "
            f"{advice} (memory allows micro-batch {max_micro})")
    if not p.use_gpu:
        warnings.append("pretrain.use_gpu is false: the run would not use the GPUs")
    warnings += transfer["warnings"]
    return {
        "variant": cfg.model.variant, "img_size": vcfg.img_size, "tokens": vcfg.num_tokens,
        "num_classes": vcfg.num_classes,
        "classes_source": "config" if p.num_classes else "assumed",
        "params": params, "macs_per_image": macs, "train_flops_per_image": flops_per_image,
        "hardware_flops_per_image": hardware_flops,
        "act_checkpoint": cfg.model.act_checkpoint, "precision": p.precision,
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
        "memory_bytes_per_gpu": memory, "gpu_memory_bytes": gpu_memory,
        "fits": memory <= gpu_memory, "max_micro_batch": max_micro,
        "tokens_per_micro_batch": tokens_per_micro,
        "interconnect": net_what, "interconnect_source": "given" if net_given else "assumed",
        "net_gb_per_s_per_gpu": net_gb, **comm,
        "images_per_s_with_comm": images_per_s * comm["compute_s"] / comm["step_s"],
        "transfer": transfer, "warnings": warnings,
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
        f"({'fits' if p['fits'] else 'DOES NOT FIT'}; plus DeepSpeed buckets and the CUDA context, a few GB); "
        f"micro-batch up to {p['max_micro_batch']} fits",
        "",
        f"Network ({p['interconnect']}; {p['interconnect_source']}"
        + ("" if p["interconnect_source"] == "given" else ": pass --interconnect NAME or GB/s per GPU") + ")",
        f"  {p['net_gb_per_s_per_gpu']:,.2f} GB/s per GPU at line rate; bus bandwidth "
        f"{p['bus_gb_per_s']:,.1f} GB/s ({'NVLink, one node' if p['nodes'] == 1 else 'the node NICs together'})",
        f"  per step: {p['comm_pattern']}, {p['grad_bytes'] / 1e9:.2f} GB of {p['precision']} gradients: "
        f"{p['comm_s'] * 1e3:,.1f} ms beside {p['compute_s'] * 1e3:,.1f} ms of compute "
        f"({p['comm_s'] / p['compute_s']:.2f}x)",
        f"  overlap assumed: communication hides behind the backward pass (DeepSpeed overlap_comm) up to "
        f"{p['hidden_comm_s'] * 1e3:,.1f} ms; exposed {p['exposed_comm_s'] * 1e3:,.1f} ms, so a step takes "
        f"{p['step_s'] * 1e3:,.1f} ms",
        f"  with it: {p['images_per_s_with_comm']:,.0f} images/s, "
        f"{_duration(p['seconds_per_epoch'] * p['step_s'] / p['compute_s'])} per epoch",
    ]
    lines += _format_transfer(p["transfer"], p["gpu_memory_bytes"])
    if p["warnings"]:
        lines += ["", "Warnings"] + [f"  ! {w}" for w in p["warnings"]]
    return "\n".join(lines)


def _format_transfer(t: dict, gpu_memory: float) -> list[str]:
    lines = ["", f"Transfer (fine-tuning at {t['img_size']} px, {t['tokens']} tokens: batch {t['batch']} over "
                 f"transfer.workers = {t['workers']} GPU(s), micro-batch {t['micro_batch']} x "
                 f"{t['grad_accum']} accumulation; SGD with momentum)",
             f"  memory per GPU: model states {t['model_state_bytes'] / 1e9:.2f} GB + activations "
             f"{t['activation_bytes'] / 1e9:.2f} GB = {t['memory_bytes_per_gpu'] / 1e9:.2f} GB of "
             f"{gpu_memory / 1e9:.0f} GB ({'fits' if t['fits'] else 'DOES NOT FIT'})"]
    if not t["rows"]:
        return lines + [f"  transfer.mode is {t['mode']}: no fine-tuning cells"]
    lines.append(f"  {'dataset':16s}{'steps':>8s}{'per cell':>12s}{'cells':>7s}{'GPU-hours':>11s}")
    for r in t["rows"]:
        lines.append(f"  {r['dataset'][:16]:16s}{r['steps']:8,d}{r['cell_s'] / 3600:10.2f} h{r['cells']:7d}"
                     f"{r['gpu_hours']:11,.1f}   ({r['steps_source']} steps)")
    lines.append(f"  total {t['gpu_hours']:,.1f} GPU-hours; at least {t['wall_s'] / 3600:,.2f} h with the cells "
                 "spread over the cluster (a final retrain waits for its LR grid)")
    return lines


def cli_main(cfg: Config, args) -> int:
    """``vitscale plan CONFIG --images N --nodes N [--gpus-per-node 8] [--gpu h100] [--mfu F] [--epochs E]
    [--interconnect NAME|GB/s]``."""
    directory = measured_dir()
    mfu, mfu_source = args.mfu, "given (--mfu)"
    if mfu is None:
        mfu, mfu_source = measured_mfu(cfg.model.variant, args.gpu, directory) or (None, "assumed")
    rate, rate_source = measured_loader_rate(directory) or (None, "assumed")
    images = args.images
    if not float(images).is_integer():
        raise InputError(f"--images: a whole number, got {images}")
    plan = make_plan(cfg, int(images), args.nodes, args.gpus_per_node, args.gpu, mfu, args.epochs,
                     rate, mfu_source=mfu_source, loader_source=rate_source,
                     interconnect=getattr(args, "interconnect", None))
    print(format_plan(plan))
    return 0
