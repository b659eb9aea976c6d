"""``vitscale bench model``: forward+backward images/s of our ViT beside timm's, same configuration.

Both models get the same weights (ours converted with ``to_timm``), the same batch and the same
autocast. One iteration is a forward pass, a cross-entropy loss and a backward pass (no optimizer step).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import ModelConfig
from pretrain.convert import timm_model_args, to_timm
from pretrain.engine import vit_config
from pretrain.errors import InputError
from pretrain.model import ViT, ViTConfig

DEFAULT_CASES = ["tiny/4@32", "S/16@224"]


def parse_case(case: str) -> ViTConfig:
    """``"S/16@224"`` -> the ViTConfig of that variant at that image size (1000 classes)."""
    variant, _, size = case.partition("@")
    try:
        return vit_config(ModelConfig(variant=variant, img_size=int(size or 224)), num_classes=1000)
    except ValueError as e:
        raise InputError(f"bench case {case!r}: {e} (expected VARIANT/PATCH@PIXELS, e.g. S/16@224)") from None


def build_pair(cfg: ViTConfig) -> tuple[nn.Module, nn.Module]:
    """Our ViT and timm's ``VisionTransformer`` with identical weights, both in training mode."""
    import timm  # noqa: PLC0415 - a benchmark/test dependency only

    ours = ViT(cfg).train()
    with torch.device("meta"):
        theirs = timm.create_model("vit_base_patch16_224", pretrained=False, **timm_model_args(cfg))
    theirs.load_state_dict({k: v.clone() for k, v in to_timm(ours.state_dict(), cfg).items()}, assign=True)
    return ours, theirs.train()


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None) -> None:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        loss = F.cross_entropy(model(x), y)
    loss.backward()


def measure(cfg: ViTConfig, batch: int, warmup: int, rounds: int | None, budget_s: float,
            dtype: torch.dtype | None, progress: str = "") -> tuple[float, float, int]:
    """Images/s of (ours, timm) from the median iteration time over alternating rounds, and the rounds.

    Each round times one iteration of each model, and the order flips every round, so a burst of load
    from another process lands on both; the median ignores the rounds it spoiled. ``rounds=None`` picks
    enough rounds to fill about ``budget_s`` seconds (at least 4), as timed during the warmup.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=gen)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=gen)
    models = build_pair(cfg)
    per_iteration = 0.0
    for model in models:
        for _ in range(max(warmup, 1)):
            start = time.perf_counter()
            _step(model, x, y, dtype)
        per_iteration = max(per_iteration, time.perf_counter() - start)
    if rounds is None:
        rounds = min(max(4, math.ceil(budget_s / (2 * per_iteration))), 1000)
    seconds: tuple[list[float], list[float]] = ([], [])
    for r in range(rounds):
        for i in (0, 1) if r % 2 == 0 else (1, 0):
            start = time.perf_counter()
            _step(models[i], x, y, dtype)
            seconds[i].append(time.perf_counter() - start)
            if progress and seconds[i][-1] > 5:  # real sizes take minutes per iteration on a CPU
                print(f"  {progress} {('ours', 'timm')[i]} iteration {r + 1}/{rounds}: {seconds[i][-1]:.1f} s",
                      file=sys.stderr, flush=True)
    return batch / statistics.median(seconds[0]), batch / statistics.median(seconds[1]), rounds


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vitscale bench model", description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="*", default=DEFAULT_CASES, help=f"VARIANT/PATCH@PIXELS (default: {' '.join(DEFAULT_CASES)})")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=1, help="untimed iterations per model (at least 1)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="timed iterations per model, alternating (ours, timm, timm, ours, ...); default: --budget")
    ap.add_argument("--budget", type=float, default=60.0,
                    help="seconds of timed iterations per case when --rounds is not given (at least 4 rounds)")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="autocast dtype on the CPU")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    return ap


def main(args: argparse.Namespace) -> int:
    """Entry point of ``vitscale bench model [CASES...] [--batch N] ...``."""
    opts = build_parser().parse_args(args.rest)
    configs = [(case, parse_case(case)) for case in opts.cases]  # bad input stops before any work
    try:
        import timm  # noqa: PLC0415, F401
    except ModuleNotFoundError:
        print("vitscale bench model: needs timm as the baseline (install the test extra)", file=sys.stderr)
        return 1
    if opts.threads:
        torch.set_num_threads(opts.threads)
    dtype = torch.bfloat16 if opts.precision == "bf16" else None
    # Without AVX512-BF16/AMX, CPU bf16 matmuls are emulated and slower than fp32: say which CPU path ran.
    print(f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{'bf16 autocast' if dtype else 'fp32, no autocast'} on the CPU, batch {opts.batch}, forward+backward, "
          f"{max(opts.warmup, 1)} warmup iteration(s), then the median of alternating timed iterations")
    print(f"{'case':<14}{'ours img/s':>12}{'timm img/s':>12}{'ours/timm':>11}{'iterations':>12}")
    for case, cfg in configs:
        ours, theirs, rounds = measure(cfg, opts.batch, opts.warmup, opts.rounds, opts.budget, dtype, progress=case)
        print(f"{case:<14}{ours:>12.2f}{theirs:>12.2f}{ours / theirs:>10.2f}x{rounds:>12}", flush=True)
    return 0
