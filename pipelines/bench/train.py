"""``vitscale bench train``: training throughput (images/s, TFLOP/s, MFU) and ZeRO model-state memory.

CPU (default): N gloo ranks of one thread each train VARIANT with DeepSpeed ZeRO-STAGE on random
images, beside plain PyTorch (AdamW) on one thread: the ratio is DeepSpeed's per-rank overhead. MFU
is against the single-core matmul rate measured here. Then the model-state bytes per rank for ZeRO 0
to 3, measured after a backward pass (parameters, gradients, fp32 master copies, Adam moments,
DeepSpeed's buffers), beside the ZeRO paper's formulas for mixed-precision Adam: 16P, 4P + 12P/N,
2P + 14P/N, 16P/N bytes.

GPU (``--gpu``): one process, one GPU, ViT-B/16 and L/16 in bf16 at 224 px, MFU against the card's
bf16 dense peak (``pretrain/flops.py``'s table). Uses DeepSpeed when it is importable, else plain
PyTorch, and says which. Needs only torch (and deepspeed), not the rest of the project's packages::

    python -m pipelines.bench.train --gpu                   # eager, about 2 minutes on an H100
    python -m pipelines.bench.train --gpu --compile both    # eager and torch.compile'd blocks
    python -m pipelines.bench.train --gpu --compile all     # ... and the whole model compiled
    python -m pipelines.bench.train --gpu --compile on --profile 3   # ... and where the device time goes

``infra/bench-gpu.sh`` runs the sequence we measure a GPU machine with; ``--json PATH`` keeps each case's
figures for its summary table.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import itertools
import json
import os
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from pipelines.plan import model_state_bytes
from pretrain.config import ModelConfig, PretrainConfig
from pretrain.engine import build_engine, init_distributed, param_groups, train_step, vit_config
from pretrain.errors import InputError
from pretrain.flops import detect_peak_tflops, model_flops_per_image
from pretrain.model import ViT, ViTConfig, num_params
from pretrain.parallelize import compile_blocks, import_deepspeed

GPU_CASES = "B/16:256,L/16:128"  # variant:micro-batch; both fit an 80 GB card in bf16 without recomputation
COMPILE_MODES = {"off": [None], "on": ["blocks"], "model": ["model"], "both": [None, "blocks"],
                 "all": [None, "blocks", "model"]}
ATTENTION = ("auto", "flash", "cudnn", "efficient", "math")  # SDPA kernels; auto = PyTorch's own choice
# Device-time categories for --profile, matched in this order against the lower-cased kernel or op name.
KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "aten::mm", "aten::addmm", "aten::bmm", "matmul")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "norm_kernel")),  # norm_kernel: the grad-norm reduction
    ("compiled (Triton: norms, GELU, adds)", ("triton",)),
)
# The plan's model-state formula per ZeRO stage (Rajbhandari et al. 2020, Fig. 1, K = 12), as printed.
ZERO_FORMULAS = {0: "16P", 1: "4P + 12P/N", 2: "2P + 14P/N", 3: "16P/N"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="vitscale bench train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="Ti/16", help="CPU mode: model variant (default Ti/16)")
    ap.add_argument("--img", type=int, default=224, help="image size in pixels")
    ap.add_argument("--batch", type=int, default=8, help="CPU mode: micro-batch per rank")
    ap.add_argument("--stage", type=int, choices=[0, 1, 2, 3], default=None,
                    help="ZeRO stage (CPU default 2; GPU default 1: one rank has nothing to partition)")
    ap.add_argument("--ranks", type=int, default=2, help="CPU mode: gloo processes")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                    help="timed runs (default: bf16 with --gpu; fp32 on CPUs, which mostly emulate bf16 slowly)")
    ap.add_argument("--steps", type=int, default=5, help="CPU mode: timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-memory", action="store_true", help="CPU mode: skip the ZeRO memory table")
    ap.add_argument("--peak-tflops", type=float, default=None, help="per-device peak TFLOP/s for MFU (a GPU, or one core; default: detect / measure)")
    ap.add_argument("--gpu", action="store_true", help="single-GPU mode: B/16 and L/16 bf16 at 224 px")
    ap.add_argument("--cases", default=GPU_CASES, help=f"GPU mode: VARIANT:BATCH,... (default {GPU_CASES})")
    ap.add_argument("--engine", choices=["auto", "deepspeed", "torch"], default="auto")
    ap.add_argument("--compile", choices=list(COMPILE_MODES), default="off",
                    help="GPU mode: 'on' compiles each transformer block (one graph, reused by every block), "
                         "'model' the whole model (the head and embedding fused too); 'both' = off + on, "
                         "'all' = off + on + model")
    ap.add_argument("--compile-mode", choices=["default", "max-autotune-no-cudagraphs", "max-autotune"],
                    default="default", help="GPU mode: torch.compile's mode for --compile (max-autotune: minutes)")
    ap.add_argument("--attention", choices=ATTENTION, default="auto",
                    help="GPU mode: the scaled_dot_product_attention kernel (auto: PyTorch picks)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="GPU mode: after each case, profile STEPS steps and print where the device time goes")
    ap.add_argument("--seconds", type=float, default=15.0, help="GPU mode: timed seconds per case")
    ap.add_argument("--json", default=None, metavar="PATH",
                    help="GPU mode: also write each case's figures to PATH (a JSON list, rewritten after every case)")
    # torch.compile's backend for --compile; "eager" traces with dynamo but generates no kernels (CPU tests)
    ap.add_argument("--compile-backend", default="inductor", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # the GPU path on CPU, for tests
    opts = ap.parse_args(argv)
    if opts.stage is None:
        opts.stage = 1 if opts.gpu else 2
    if opts.precision is None:
        opts.precision = "bf16" if opts.gpu else "fp32"
    return opts


def main(args: argparse.Namespace) -> int:
    opts = parse_args(list(getattr(args, "rest", None) or []))
    return gpu_main(opts) if opts.gpu else cpu_main(opts)


# --------------------------------------------------------------------------- shared pieces


def _pretrain_slice(batch: int, world: int, stage: int, precision: str, use_gpu: bool, **deepspeed) -> PretrainConfig:
    """The ``pretrain`` slice of a run with one optimizer step per micro-batch (no accumulation); the
    rest (betas, weight decay, clipping, schedule) is the config's defaults, as pretraining has them."""
    return dataclasses.replace(
        PretrainConfig(), workers=world, global_batch=batch * world, micro_batch=batch, steps=10**6, lr=1e-4,
        warmup_steps=1, precision=precision, zero_stage=stage, use_gpu=use_gpu, deepspeed=deepspeed)


def _vit(variant: str, img_size: int) -> ViTConfig:
    """The model a ``model`` slice of this variant and size describes (1000 classes), built the way
    pretraining builds it."""
    return vit_config(dataclasses.replace(ModelConfig(), variant=variant, img_size=img_size), num_classes=1000)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches(vit: ViTConfig, batch: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, vit.img_size, vit.img_size, generator=g).to(device)
    y = torch.randint(0, vit.num_classes, (batch,), generator=g).to(device)
    return itertools.repeat((x, y))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Callable[[], None], device: torch.device, warmup: int, steps: int = 0, seconds: float = 0.0) -> tuple[int, float]:
    """Run ``warmup`` steps, then ``steps`` more or as many as fit in ``seconds``; returns (steps, seconds)."""
    for _ in range(warmup):
        step()
    _sync(device)
    start, n = time.perf_counter(), 0
    while n < max(steps, 1) or time.perf_counter() - start < seconds:
        step()
        n += 1
        if seconds:
            _sync(device)  # so that the clock sees the GPU's work, not just the queued launches
    _sync(device)
    return n, time.perf_counter() - start


# --------------------------------------------------------------------------- CPU: ranks, baseline, memory


def live_tensor_bytes(extra: tuple = ()) -> int:
    """Bytes of every distinct tensor storage alive in this process (plus ``extra`` tensors, e.g. gradients
    that exist only on the C++ side until touched from Python)."""
    gc.collect()
    seen, total = set(), 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on some library objects warns about deprecations
        tensors = [obj for obj in itertools.chain(gc.get_objects(), extra) if isinstance(obj, torch.Tensor)]
    for obj in tensors:
        try:
            if obj.is_meta:
                continue
            storage = obj.untyped_storage()
        except Exception:  # noqa: BLE001 - some tensor subclasses refuse storage access; they hold nothing here
            continue
        key = (storage.data_ptr(), str(storage.device))
        if storage.nbytes() and key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def _model_state_bytes(vit: ViTConfig, stage: int, world: int, batch: int) -> int:
    """Tensor bytes one engine holds after a full step and a second backward (gradients and Adam moments
    all exist): live storage then minus live storage before the model was built (an earlier engine's
    leftovers, which DeepSpeed does not release in full, stay out of the count)."""
    before = live_tensor_bytes()
    torch.manual_seed(0)
    model = ViT(vit)
    bucket = max(num_params(model) // 8 // 64 * 64, 1024)  # DeepSpeed wants multiples of its alignment
    p = _pretrain_slice(batch, world, stage, "bf16", False,
                        # Buckets an eighth of the model, so that they do not dwarf a small one; every
                        # parameter partitioned under ZeRO-3, as the paper's formula assumes.
                        zero_optimization={"reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
                                           "stage3_prefetch_bucket_size": bucket,
                                           "stage3_param_persistence_threshold": 0})
    engine = build_engine(model, p, world)
    batches = _batches(vit, batch, engine.device)
    train_step(engine, batches)
    images, labels = next(batches)
    engine.backward(F.cross_entropy(engine(images.to(torch.bfloat16)).float(), labels))
    del images, labels, batches
    grads = tuple(q.grad for q in engine.module.parameters() if q.grad is not None)
    used = live_tensor_bytes(grads) - before
    engine.step()
    del engine, grads
    gc.collect()
    return used


def _rank_main(rank: int, world: int, port: int, opts: argparse.Namespace, results) -> None:
    """One gloo rank: the memory table's stages, then the timed run of ``opts.stage``."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)  # one core per rank: the CPU's stand-in for one device per rank
    info = init_distributed(use_gpu=False)
    vit = _vit(opts.variant, opts.img)
    if not opts.no_memory:
        for stage in ZERO_FORMULAS:
            results.put(("memory", rank, stage, _model_state_bytes(vit, stage, world, 2)))
    torch.manual_seed(0)
    engine = build_engine(ViT(vit), _pretrain_slice(opts.batch, world, opts.stage, opts.precision, False), world)
    batches = _batches(vit, opts.batch, info.device, seed=rank)
    n, seconds = _timed(lambda: train_step(engine, batches), info.device, opts.warmup, opts.steps)
    results.put(("speed", rank, n * opts.batch * world, seconds))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # not left to the interpreter's exit, which can abort


def _baseline(vit: ViTConfig, batch: int, precision: str, warmup: int, steps: int) -> float:
    """Images/s of plain PyTorch in this process on one thread (as one rank has): fp32 weights (bf16
    autocast if asked), AdamW with the same parameter groups, the same clipping."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ViT(vit).train()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4)
    x, y = next(_batches(vit, batch, torch.device("cpu")))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    n, seconds = _timed(step, torch.device("cpu"), warmup, steps)
    return n * batch / seconds


def cpu_matmul_peak_tflops(size: int = 1024, seconds: float = 1.0) -> float:
    """The best single-thread matmul rate of this CPU, bf16 or fp32 (CPUs without bf16 units emulate it
    slowly): the per-core 'peak' that CPU MFU is measured against."""
    torch.set_num_threads(1)
    best = 0.0
    for dtype in (torch.bfloat16, torch.float32):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        torch.mm(a, b)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            torch.mm(a, b)
            n += 1
        best = max(best, 2 * size**3 * n / (time.perf_counter() - start) / 1e12)
    return best


def cpu_main(opts: argparse.Namespace) -> int:
    import torch.multiprocessing as mp

    vit = _vit(opts.variant, opts.img)
    flops = model_flops_per_image(vit)
    peak = opts.peak_tflops or cpu_matmul_peak_tflops()
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_rank_main, args=(opts.ranks, _free_port(), opts, results), nprocs=opts.ranks, join=True)
    rows = []
    while not results.empty():
        rows.append(results.get())
    speed = [r for r in rows if r[0] == "speed"]
    ds_img_s = speed[0][2] / max(r[3] for r in speed)  # all ranks together; the slowest sets the pace
    base_img_s = _baseline(vit, opts.batch, opts.precision, opts.warmup, opts.steps)

    print(f"vitscale bench train: {opts.variant} at {opts.img} px ({num_params(ViT(vit)) / 1e6:.2f} M params, "
          f"{flops / 1e9:.1f} GFLOP per training image), {opts.precision}, micro-batch {opts.batch}, CPU with "
          f"{os.cpu_count()} cores; one thread per rank; MFU against the single-core matmul rate, "
          f"{peak * 1e3:.1f} GFLOP/s")
    print(f"{'':38s}{'images/s':>10s}{'GFLOP/s':>10s}{'MFU':>8s}")
    for name, img_s in ((f"DeepSpeed ZeRO-{opts.stage}, per rank of {opts.ranks}", ds_img_s / opts.ranks),
                        ("baseline: PyTorch, 1 process", base_img_s)):
        tflops = img_s * flops / 1e12
        print(f"{name:38s}{img_s:10.2f}{tflops * 1e3:10.1f}{tflops / peak:8.1%}")
    print(f"{'ratio (DeepSpeed overhead shows < 1)':38s}{ds_img_s / opts.ranks / base_img_s:10.2f}")
    print(f"all {opts.ranks} ranks together: {ds_img_s:.2f} images/s")
    if not opts.no_memory:
        _print_memory(vit, opts.ranks, [r for r in rows if r[0] == "memory"])
    return 0


def _print_memory(vit: ViTConfig, world: int, rows: list) -> None:
    params = num_params(ViT(vit))
    mib = 2**20
    print(f"\nmodel-state memory per rank, bf16 + fp32 AdamW, P = {params / 1e6:.2f} M, N = {world} "
          f"(measured: live tensor storage after a backward pass, largest rank)")
    print(f"{'ZeRO':6s}{'measured MiB':>14s}{'formula':>14s}{'formula MiB':>13s}{'ratio':>8s}")
    for stage, text in ZERO_FORMULAS.items():
        measured = max(r[3] for r in rows if r[2] == stage)
        expected = model_state_bytes(params, world, stage, "bf16")
        print(f"{stage:<6d}{measured / mib:14.1f}{text:>14s}{expected / mib:13.1f}{measured / expected:8.2f}")


# --------------------------------------------------------------------------- GPU: one process, one device


@dataclass
class GpuResult:
    case: str
    batch: int
    img_s: float
    tflops: float
    mem_gib: float
    profile: list[str]  # --profile's table, printed under the case's row


def _use_deepspeed(engine: str) -> tuple[bool, str]:
    """(use DeepSpeed?, why not). ``auto`` falls back to PyTorch when DeepSpeed is missing or broken."""
    if engine == "torch":
        return False, "not used"
    try:
        import_deepspeed()
    except Exception as e:  # noqa: BLE001 - an install without its CUDA pieces can fail in many ways
        if engine == "deepspeed":
            raise InputError(f"--engine deepspeed: cannot import deepspeed: {e}") from None
        return False, "not installed" if isinstance(e, ImportError) else f"unusable: {type(e).__name__}"
    return True, ""


def _gpu_case(vit: ViTConfig, batch: int, use_ds: bool, compiled: Optional[str], opts: argparse.Namespace,
              device: torch.device) -> GpuResult:
    torch.manual_seed(0)
    model = ViT(vit).to(device).train()
    mode = None if opts.compile_mode == "default" else opts.compile_mode
    if compiled == "blocks" and opts.compile_backend == "inductor":  # as pretraining does: compile, then wrap
        compile_blocks(model, mode)
    elif compiled == "blocks":
        for block in model.blocks:
            block.compile(backend=opts.compile_backend)
    elif compiled == "model":
        model.compile(mode=mode, backend=opts.compile_backend)
    batches = _batches(vit, batch, device)
    if use_ds:
        engine = build_engine(model, _pretrain_slice(batch, 1, opts.stage, opts.precision, device.type == "cuda"), 1)

        def step() -> None:
            train_step(engine, batches)
    else:
        fused = {"fused": True} if device.type == "cuda" else {}
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, **fused)
        x, y = next(batches)

        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=opts.precision == "bf16"):
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    n, seconds = _timed(step, device, opts.warmup + (2 if compiled else 0), seconds=opts.seconds)
    img_s = n * batch / seconds
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    table = list(profile_table(step, device, opts.profile)) if opts.profile else []
    return GpuResult("", batch, img_s, img_s * model_flops_per_image(vit) / 1e12, mem, table)


def _kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def profile_table(step: Callable[[], None], device: torch.device, steps: int, top: int = 12) -> Iterator[str]:
    """Where ``steps`` steps spend their device time: by kind (matmul, attention, ...), then the ``top``
    kernels. On a GPU these are the CUDA kernels; on the CPU (tests) the operators' own CPU time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    _sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    if gpu:
        times = {e.key: e.self_device_time_total for e in prof.key_averages() if e.device_type == DeviceType.CUDA}
    else:  # operators only (aten::...): the Python-level ranges would count their children twice
        times = {e.key: e.self_cpu_time_total for e in prof.key_averages() if e.key.startswith("aten::")}
    total = sum(times.values()) or 1.0
    kinds: dict[str, float] = {}
    for name, us in times.items():
        kind = _kind(name)
        kinds[kind] = kinds.get(kind, 0.0) + us
    yield f"  {'GPU kernel' if gpu else 'CPU operator'} time per step {total / steps / 1e3:.1f} ms: " + ", ".join(
        f"{kind} {us / total:.0%}" for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1]))
    for name, us in sorted(times.items(), key=lambda kv: -kv[1])[:top]:
        yield f"  {us / total:6.1%} {us / steps / 1e3:8.2f} ms  {_kind(name):10.10s} {name[:90]}"


def _fitting(vit: ViTConfig, batch: int, use_ds: bool, compiled: Optional[str], opts: argparse.Namespace,
             device: torch.device) -> GpuResult:
    """``_gpu_case``, halving the batch while it does not fit in the device's memory."""
    while True:
        try:
            return _gpu_case(vit, batch, use_ds, compiled, opts, device)
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
            print(f"  (out of memory: retrying with batch {batch})", flush=True)
            gc.collect()
            torch.cuda.empty_cache()


def _attention_kernel(name: str):
    """A context that restricts scaled_dot_product_attention to one kernel (a fresh one per use)."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH if name == "math" else getattr(SDPBackend, f"{name.upper()}_ATTENTION"))


def gpu_main(opts: argparse.Namespace) -> int:
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--gpu: no CUDA device visible (CUDA_VISIBLE_DEVICES, driver?)")
    use_ds, why_not = _use_deepspeed(opts.engine)
    torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 bits (loss, norms) may use TF32
    torch.backends.cudnn.allow_tf32 = True
    if use_ds:
        import deepspeed

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
        init_distributed(use_gpu=device.type == "cuda")
        what = (f"DeepSpeed {deepspeed.__version__} ZeRO-{opts.stage}, {opts.precision} weights with fp32 master "
                f"copies, torch AdamW{' (fused)' if device.type == 'cuda' else ''}")
    else:
        what = (f"PyTorch (DeepSpeed {why_not}): fp32 weights, {opts.precision} autocast, "
                f"AdamW{' (fused)' if device.type == 'cuda' else ''}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = opts.peak_tflops or detect_peak_tflops(device)
    print(f"vitscale bench train --gpu: {name}, torch {torch.__version__}; engine: {what}")
    print(f"MFU against {peak} TFLOP/s (bf16 dense peak)" if peak else "MFU: peak unknown (pass --peak-tflops)")
    if opts.compile != "off" or opts.attention != "auto":
        print(f"torch.compile mode: {opts.compile_mode}; attention kernel: {opts.attention}")
    print(f"{'case':22s}{'batch':>6s}{'images/s':>10s}{'TFLOP/s':>9s}{'MFU':>7s}{'peak mem GiB':>13s}")
    modes = COMPILE_MODES[opts.compile]
    records = []
    for case in opts.cases.split(","):
        variant, _, batch_text = case.strip().partition(":")
        try:
            vit = _vit(variant, opts.img)
            batch = int(batch_text or 64)
        except ValueError as e:
            raise InputError(f"--cases {case!r}: {e} (expected VARIANT:BATCH, e.g. L/16:128)") from None
        for compiled in modes:
            label = f"{variant}@{opts.img}{f' compiled {compiled}' if compiled else ''}"
            with _attention_kernel(opts.attention):
                r = _fitting(vit, batch, use_ds, compiled, opts, device)
            mfu = f"{r.tflops / peak:7.1%}" if peak else f"{'-':>7s}"
            print(f"{label:22s}{r.batch:6d}{r.img_s:10.1f}{r.tflops:9.1f}{mfu}{r.mem_gib:13.1f}", flush=True)
            records.append({"case": label, "variant": variant, "batch": r.batch, "img_per_s": r.img_s,
                            "tflops": r.tflops, "mfu": r.tflops / peak if peak else None, "mem_gib": r.mem_gib,
                            "engine": f"deepspeed zero-{opts.stage}" if use_ds else "torch", "device": name,
                            "torch": torch.__version__})
            if opts.json:  # after every case: a step stopped at its time limit keeps what it finished
                with open(opts.json, "w") as f:
                    json.dump(records, f, indent=1)
            for line in r.profile:
                print(line, flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main(argparse.Namespace(rest=sys.argv[1:])))
