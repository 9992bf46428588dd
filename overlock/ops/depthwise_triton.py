"""Depthwise convolution for GPUs in Triton: forward, input gradient and weight gradient, channels_last.

Why: on an H200 (cuDNN 9.19, bf16, channels_last) OverLoCK's large and dilated depthwise convs run in cuDNN's
slow direct kernel and take three quarters of a training step (forward and both gradients of a 17x17 conv on
128x64x56x56: 47 ms; benchmarks/README.md, GPU section). These kernels are a direct loop over the taps: each
program owns a tile of output pixels of one sample and a block of channels (contiguous in channels_last) and
accumulates in float32.

Opt-in until measured on a GPU: ``OVERLOCK_GPU_DEPTHWISE=triton`` routes CUDA depthwise convs here
(``ops.depthwise``). ``benchmarks/gpu_depthwise.py`` checks and times them. The tests run the kernels on the CPU
through Triton's interpreter (``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional, Tuple

import torch

from .native import _taps  # the kernel as (kh*kw, C): a vector of channels per tap

__all__ = ["available", "enabled", "depthwise_conv2d"]


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Triton is installed (it ships with CUDA builds of torch)."""
    return importlib.util.find_spec("triton") is not None


def enabled(x: torch.Tensor) -> bool:
    """The user asked for these kernels and they can run on ``x``'s device."""
    if os.environ.get("OVERLOCK_GPU_DEPTHWISE", "") != "triton":
        return False
    return (x.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1") and available()


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype of ``device_type`` where autocast is on, else ``None``."""
    from .recompute import autocast_state
    return next((dtype for device, on, dtype in autocast_state() if device == device_type and on), None)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """``(N, H, W, C)`` contiguous view of a channels_last map (a copy if it is not channels_last)."""
    return t.permute(0, 2, 3, 1).contiguous()


def _forward(x: torch.Tensor, taps: torch.Tensor, bias: Optional[torch.Tensor], kh: int, kw: int,
             padding: Tuple[int, int], dilation: int) -> torch.Tensor:
    from ._depthwise_triton_kernels import dw_forward
    N, C, H, W = x.shape
    xs = _nhwc(x)
    y = torch.empty_like(xs)

    def grid(meta):
        return _cdiv(H, meta["BH"]) * _cdiv(W, meta["BW"]), _cdiv(C, meta["BC"]), N
    dw_forward[grid](xs, taps, bias if bias is not None else taps, y, H, W, C, kh, kw, padding[0], padding[1],
                     dilation, HAS_BIAS=bias is not None)
    return y.permute(0, 3, 1, 2)  # channels_last (N, C, H, W)


def _weight_grad(x: torch.Tensor, g: torch.Tensor, kh: int, kw: int, padding: Tuple[int, int],
                 dilation: int) -> torch.Tensor:
    from ._depthwise_triton_kernels import MAX_BP, dw_weight_grad
    N, C, H, W = x.shape
    xs, gs = _nhwc(x), _nhwc(g)
    total = N * H * W
    splits = max(1, min(64, total // 4096))  # enough programs to fill a GPU; few partial sums to add
    per = _cdiv(_cdiv(total, splits), MAX_BP) * MAX_BP
    splits = _cdiv(total, per)
    part = torch.empty(splits, kh * kw, C, device=x.device, dtype=torch.float32)

    def grid(meta):
        return kh * kw, _cdiv(C, meta["BC"]), splits
    dw_weight_grad[grid](xs, gs, part, N, H, W, C, kh, kw, padding[0], padding[1], dilation, per)
    return part.sum(0).t().reshape(C, 1, kh, kw)


class _DepthwiseTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, padding, dilation):
        kh, kw = weight.shape[-2:]
        ctx.save_for_backward(x, weight)
        ctx.conf = (kh, kw, padding, dilation, bias is not None)
        return _forward(x, _taps(weight), bias, kh, kw, padding, dilation)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        kh, kw, padding, dilation, has_bias = ctx.conf
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # the input gradient is the same conv of the output gradient with the kernel turned 180 degrees
            flipped = _taps(weight.flip(-1, -2))
            pad = (dilation * (kh - 1) - padding[0], dilation * (kw - 1) - padding[1])
            grad_x = _forward(grad.contiguous(memory_format=torch.channels_last), flipped, None, kh, kw, pad,
                              dilation)
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(x, grad, kh, kw, padding, dilation).to(weight.dtype)
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     padding: Tuple[int, int] = (0, 0), dilation: int = 1) -> torch.Tensor:
    """Stride-1 depthwise ``F.conv2d`` whose output has the input's size (``2 * padding == dilation * (k - 1)``),
    in the autocast dtype where autocast is on, as the conv would run; output channels_last."""
    dtype = _autocast_dtype(x.device.type) or x.dtype
    x, weight = x.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    return _DepthwiseTriton.apply(x, weight, bias, tuple(padding), dilation)
