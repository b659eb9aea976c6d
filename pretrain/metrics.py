"""Throughput accounting: images/s, achieved TFLOP/s, MFU and HFU, data-wait fraction and memory.

FLOPs come from the ViT's shape (``pretrain.model.macs_per_image``): 2 FLOPs per multiply-add. As PaLM
defines them, *model* FLOPs of a training step are 3 forward passes (forward + backward, twice the
forward) whatever the implementation does; *hardware* FLOPs add the forward that activation
checkpointing recomputes. MFU = achieved model FLOP/s per device / the device's peak, HFU the same
with hardware FLOPs: with checkpointing, MFU = 3/4 HFU.
"""
from __future__ import annotations

import contextlib
import resource
import sys
import time
from typing import Iterator, Optional

import torch

from pretrain.model import ViTConfig, macs_per_image

# Dense bf16 peak per device in TFLOP/s (no sparsity), by a substring of the CUDA device name; the first
# match wins, so the PCIe card (lower clocks) comes before the SXM one.
PEAK_TFLOPS: dict[str, float] = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0}


def model_flops_per_image(vit: ViTConfig, img_size: Optional[int] = None) -> float:
    """Model FLOPs of one training step per image: 2 x MACs x 3 (forward + backward)."""
    return 2.0 * macs_per_image(vit, img_size) * 3


def hardware_flops_per_image(vit: ViTConfig, act_checkpoint: bool, img_size: Optional[int] = None) -> float:
    """FLOPs the device runs per image: the model FLOPs plus the recomputed forward when checkpointing."""
    return 2.0 * macs_per_image(vit, img_size) * (4 if act_checkpoint else 3)


def detect_peak_tflops(device: torch.device | str | None = None) -> Optional[float]:
    """The bf16 peak of the CUDA device from its name, or None (CPU, or a card not in the table)."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


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
