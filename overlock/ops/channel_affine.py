"""LayerScale's ``x * w + b`` (per channel) for CPU training, with a backward that reads the maps once.

Autograd's backward of ``addcmul(b, x, w)`` computes the weight gradient as ``(g * x).sum((0, 2, 3))``: a map-sized
product written to fresh memory and read again (on an overlock_t step, 8x384x14x14: ~1.8 ms for the product alone,
most of it page faults on the fresh buffer, against ~0.2 ms for the sums). Here both parameter gradients come from
one read of ``g`` and ``x`` (:func:`overlock.ops.native.grn_backward_sums`, GRN's per-channel sums), and the
input gradient is autograd's ``g * w``. The forward is the very ``addcmul``; gradients agree to float rounding.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import native

__all__ = ["channel_affine", "native_applies"]


def native_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> bool:
    """Training on a float32 channels_last CPU map with a multiple of 8 channels, eager mode, kernels in use."""
    return (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad)
            and x.device.type == "cpu" and x.dtype == weight.dtype == bias.dtype == torch.float32
            and x.dim() == 4 and x.shape[1] % 8 == 0 and x.is_contiguous(memory_format=torch.channels_last)
            and not torch.jit.is_scripting() and not torch.jit.is_tracing() and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled("cpu") and native.used_here())


def channel_affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x * weight + bias`` per channel (``weight``: any shape of ``C`` values, ``bias``: ``(C,)``)."""
    if native_applies(x, weight, bias):
        return _ChannelAffine.apply(x, weight, bias)
    return torch.addcmul(bias.view(1, -1, 1, 1), x, weight.view(1, -1, 1, 1))


class _ChannelAffine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return torch.addcmul(bias.view(1, -1, 1, 1), x, weight.view(1, -1, 1, 1))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_w = grad_b = None
        if need_w or need_b:
            sums = native.grn_backward_sums(grad, x)  # None unless grad is channels_last like x
            if sums is not None:
                dot, total = sums[0].sum(0), sums[1].sum(0)
            else:
                dot, total = (grad * x).sum((0, 2, 3)), grad.sum((0, 2, 3))
            grad_w = dot.view_as(weight) if need_w else None
            grad_b = total if need_b else None
        grad_x = grad * weight.view(1, -1, 1, 1) if need_x else None
        return grad_x, grad_w, grad_b
