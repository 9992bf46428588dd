"""Depthwise convolution whose weight gradient is fast on CPU.

PyTorch's CPU backend (oneDNN) runs a large-kernel depthwise convolution forward near GEMM speed in
channels_last, but its *weight* gradient many times slower than the forward; in an OverLoCK training step those
weight gradients dominated (figures in benchmarks/README.md).

The weight gradient of a depthwise conv is itself a depthwise conv with the roles swapped:
``dW[c, i, j] = sum_b sum_yx xpad[b, c, y + i*d, x + j*d] * dY[b, c, y, x]``, i.e. every (sample, channel)
pair is one channel of a depthwise conv whose *input* is the zero-padded activation, whose *kernel* is the
output gradient (map-sized), with stride = the dilation, giving a ``k x k`` output; summing over samples gives
``dW``. The input gradient and the forward use the native kernels.

Only used on CPU for float32 tensors, outside autocast and for kernels of 5 taps or more (3x3 has a fast native
weight gradient); everywhere else :func:`depthwise_conv2d` is plain ``F.conv2d``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["depthwise_conv2d", "depthwise_weight_grad"]

MIN_TAPS = 5  # kernels narrower than this keep the native weight gradient


def depthwise_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, kernel: Tuple[int, int],
                          padding: Tuple[int, int], dilation: int = 1) -> torch.Tensor:
    """``dW`` (shape ``(C, 1, kh, kw)``) of a stride-1 depthwise conv, as one forward depthwise conv (see module)."""
    B, C, H, W = x.shape
    ph, pw = padding
    xp = F.pad(x, (pw, pw, ph, ph)).reshape(1, B * C, H + 2 * ph, W + 2 * pw)
    g = grad_out.reshape(B * C, 1, grad_out.shape[2], grad_out.shape[3])
    out = F.conv2d(xp, g, stride=dilation, groups=B * C)  # (1, B*C, 2*ph/d + 1, 2*pw/d + 1)
    return out.reshape(B, C, *kernel).sum(0).unsqueeze(1)


class _DepthwiseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, padding, dilation):
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.dilation, ctx.has_bias = padding, dilation, bias is not None
        return F.conv2d(x, weight, bias, padding=padding, dilation=dilation, groups=weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        d = ctx.dilation
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, [1, 1], list(ctx.padding), [d, d], False, [0, 0], weight.shape[0],
                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = depthwise_weight_grad(x, grad_out, tuple(weight.shape[-2:]), ctx.padding, d).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def _use_fast_grad(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (weight.requires_grad and torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dtype == torch.float32 and weight.dtype == torch.float32
            and max(weight.shape[-2:]) >= MIN_TAPS and not _cpu_autocast())


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     padding: Tuple[int, int] = (0, 0), dilation: int = 1) -> torch.Tensor:
    """Stride-1 depthwise ``F.conv2d`` (``groups = channels``), same values and gradients, faster CPU training."""
    if _use_fast_grad(x, weight):
        return _DepthwiseConv.apply(x, weight, bias, tuple(padding), dilation)
    return F.conv2d(x, weight, bias, padding=padding, dilation=dilation, groups=weight.shape[0])
