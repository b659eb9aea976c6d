"""FLOPs per image and the accelerators' peaks: the one table that MFU, the benchmarks and the plan share.

FLOPs come from the ViT's shape (``pretrain.model.macs_per_image``), 2 FLOPs per multiply-add. As PaLM
defines them, *model* FLOPs of a training step are 3 forward passes (forward + backward, twice the
forward) whatever the implementation does; *hardware* FLOPs add the forward that activation
checkpointing recomputes, so with checkpointing MFU = 3/4 HFU.

Peaks are the vendors' data-sheet figures for dense tensor-core math (no sparsity): bf16 and fp16 run at
one rate, fp32 matmuls run as TF32 at half of it. NVLink is one direction per GPU, the bandwidth an
all-reduce inside one node gets at best.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pretrain.model import ViTConfig, macs_per_image


@dataclass(frozen=True)
class Accelerator:
    key: str  # the plan's --gpu name
    device_name: str  # a substring of torch.cuda.get_device_name(); GPUS is searched in order
    bf16_tflops: float  # dense; fp16 the same
    tf32_tflops: float  # what fp32 matmuls run as
    memory_gb: float
    nvlink_gbs: float  # per GPU, one direction (PCIe cards: PCIe Gen5 x16)

    def peak_tflops(self, precision: str = "bf16") -> float:
        return self.tf32_tflops if precision == "fp32" else self.bf16_tflops


# The PCIe card (lower clocks) comes before the SXM one whose name it contains.
GPUS: tuple[Accelerator, ...] = (
    Accelerator("h100-pcie", "H100 PCIe", 756.0, 378.0, 80.0, 64.0),
    Accelerator("h200", "H200", 989.0, 494.5, 141.0, 450.0),
    Accelerator("h100", "H100", 989.0, 494.5, 80.0, 450.0),
    Accelerator("a100", "A100", 312.0, 156.0, 80.0, 300.0),
)
BY_KEY: dict[str, Accelerator] = {g.key: g for g in GPUS}
# bf16 peak by device-name substring, first match wins (the Meter's and the benches' lookup).
PEAK_TFLOPS: dict[str, float] = {g.device_name: g.bf16_tflops for g in GPUS}


def model_flops_per_image(vit: ViTConfig, img_size: Optional[int] = None) -> float:
    """Model FLOPs of one training step per image: 2 x MACs x 3 (forward + backward)."""
    return 2.0 * macs_per_image(vit, img_size) * 3


def hardware_flops_per_image(vit: ViTConfig, act_checkpoint: bool, img_size: Optional[int] = None) -> float:
    """FLOPs the device runs per image: the model FLOPs plus the recomputed forward when checkpointing."""
    return 2.0 * macs_per_image(vit, img_size) * (4 if act_checkpoint else 3)


def accelerator_for(device_name: str) -> Optional[Accelerator]:
    """The table's entry for a CUDA device name (e.g. "NVIDIA H100 80GB HBM3"), or None."""
    return next((g for g in GPUS if g.device_name in device_name), None)


def detect_peak_tflops(device=None, precision: str = "bf16") -> Optional[float]:
    """The peak of the CUDA device from its name, or None (CPU, or a card not in the table)."""
    import torch

    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return None
    gpu = accelerator_for(torch.cuda.get_device_name(device))
    return gpu.peak_tflops(precision) if gpu else None
