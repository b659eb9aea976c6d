"""Throughput accounting: images/s, achieved TFLOP/s, MFU and HFU, data-wait fraction and memory.

MFU = achieved model FLOP/s per device / the device's peak, HFU the same with hardware FLOPs; the FLOP
counts and the peaks are ``pretrain.flops``'s, the table the benchmarks and the plan use too.
"""
from __future__ import annotations

import contextlib
import resource
import sys
import time
from typing import Iterator, Optional

import torch

from pretrain.flops import PEAK_TFLOPS, detect_peak_tflops, hardware_flops_per_image, model_flops_per_image

__all__ = ["PEAK_TFLOPS", "Meter", "detect_peak_tflops", "hardware_flops_per_image", "memory_stats",
           "model_flops_per_image"]


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak memory of this process in GiB: the CUDA allocator's peak on a GPU, else the peak RSS."""
    if device.type == "cuda":
        return {"mem_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "mem_reserved_gib": torch.cuda.memory_reserved(device) / 2**30}
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return {"mem_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30}


class Meter:
    """Accumulates images, step time and data-wait time between two ``report`` calls (one log window)."""

    def __init__(self, flops_per_image: float, world_size: int, peak_tflops: Optional[float],
                 hardware_flops_per_image: Optional[float] = None):
        self.flops_per_image = flops_per_image
        self.hardware_flops_per_image = hardware_flops_per_image or flops_per_image
        self.world_size = world_size
        self.peak_tflops = peak_tflops
        self._reset()

    def _reset(self) -> None:
        self.images = 0
        self.data_s = 0.0
        self.excluded_s = 0.0
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        """Time spent inside (evaluation, checkpointing) does not count against training throughput."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.excluded_s += time.perf_counter() - start

    def add(self, images: int, data_s: float) -> None:
        """Record ``images`` trained on all ranks together and ``data_s`` seconds spent waiting for input."""
        self.images += images
        self.data_s += data_s

    def report(self) -> dict[str, float]:
        """Rates over the window since the last report, then start a new window."""
        seconds = max(time.perf_counter() - self.start - self.excluded_s, 1e-9)
        img_s = self.images / seconds
        tflops = img_s * self.flops_per_image / self.world_size / 1e12  # per device, model FLOPs
        hardware = tflops * self.hardware_flops_per_image / self.flops_per_image
        out = {"img_per_s": img_s, "tflops_per_device": tflops, "hardware_tflops_per_device": hardware,
               "data_wait_frac": min(self.data_s / seconds, 1.0)}
        if self.peak_tflops:
            out["mfu"] = tflops / self.peak_tflops
            out["hfu"] = hardware / self.peak_tflops
        self._reset()
        return out
