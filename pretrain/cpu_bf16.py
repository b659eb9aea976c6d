"""``Linear``: ``nn.Linear`` whose backward picks fast matmul layouts for bf16 on CPUs without native bf16.

On a CPU without AVX512-BF16 or AMX (``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is false), torch
runs bf16 matmuls through its generic CPU GEMM, whose speed depends on the operands' memory layout by up
to 9x: ``A @ B`` with both row-major is the slowest case, ``A @ W.t()`` (what a linear's forward does) the
fastest. ``nn.Linear``'s backward computes ``grad @ W`` and ``grad.t() @ x``, the two slow layouts, so on
such a CPU a bf16 training step spends most of its time there. Copying the operands into the fast layout
first costs a transpose of each, and makes the backward of a ViT linear about 4x faster.
The arithmetic is the same bf16 matmul with fp32 accumulation; everywhere else (GPUs, CPUs with native
bf16, fp32) ``Linear`` is ``nn.Linear``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# Read once: a plain constant is what torch.compile can trace without a cache wrapper in the way.
try:
    NATIVE_BF16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
except (AttributeError, RuntimeError):  # a build without oneDNN: its bf16 GEMM is the generic one
    NATIVE_BF16 = False


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return x.dtype


def _rowmajor_t(a: torch.Tensor) -> torch.Tensor:
    """``a`` (2-D) with the same values, stored transposed: the fast right operand."""
    return a.t().contiguous().t()


class _LinearFastLayout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (g @ _rowmajor_t(w)).view(x.shape)
        if ctx.needs_input_grad[1]:
            gw = g.t().contiguous() @ _rowmajor_t(x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) with the fast-layout backward where it pays."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or not torch.is_grad_enabled() or _compute_dtype(x) != torch.bfloat16 or NATIVE_BF16:
            return super().forward(x)
        bias = self.bias.to(torch.bfloat16) if self.bias is not None else None
        return _LinearFastLayout.apply(x.to(torch.bfloat16), self.weight.to(torch.bfloat16), bias)
