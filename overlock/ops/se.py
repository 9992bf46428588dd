"""Squeeze-and-excitation for training: ``x * gate(mean_hw(x))`` with a backward of two passes over the map.

Autograd runs SE's backward as five passes over map-sized tensors: the product's two gradients (``g * s`` and
``g * x``), the reduction of the second, the mean's gradient expanded over the map and its sum with the first.
Here: ``ds = sum_hw(g * x)`` in one read (the native kernel GRN's backward uses, or a chunked reduction), the gate's
small backward by autograd on its ``(B, C)`` input, then ``dx = g * s + dm / HW`` in one more pass (``addcmul``).
The forward runs the module's own layers (the same bits); gradients agree with autograd's to float rounding.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import grn as grn_ops
from . import native

__all__ = ["applies", "squeeze_excite"]


def applies(x: torch.Tensor) -> bool:
    """Eager autograd over a 4-d float32/float64 map (not under torch.compile / tracing, which see the plain graph;
    no autocast, whose casts the plain graph records)."""
    return (torch.is_grad_enabled() and grn_ops.fast_path(x) and not torch.is_autocast_enabled(x.device.type))


def squeeze_excite(se: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x * se.proj(x)`` keeping ``x`` and the ``(B, C)`` gate for backward (see module docstring)."""
    params = tuple(p for p in se.proj.parameters())
    return _SqueezeExcite.apply(se, len(params), x, *params)


def _gate(se: nn.Module, m: torch.Tensor) -> torch.Tensor:
    """The gate from the pooled map: ``se.proj`` after its pooling layer."""
    for layer in list(se.proj)[1:]:
        m = layer(m)
    return m


class _SqueezeExcite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, se, n_params, x, *params):
        ctx.se = se
        with torch.no_grad():
            m = se.proj[0](x)
            s = _gate(se, m)
            out = x * s
        ctx.save_for_backward(x, m, s, *params)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, m, s, *params = ctx.saved_tensors
        B, C, H, W = x.shape
        if x.is_contiguous(memory_format=torch.channels_last):
            g = g.contiguous(memory_format=torch.channels_last)
        got = native.grn_backward_sums(g, x)
        ds = got[0] if got is not None else grn_ops.spatial_dot(g, x)
        want = [p for p, need in zip(params, ctx.needs_input_grad[3:]) if need]
        with torch.enable_grad():
            m_ = m.detach().requires_grad_()
            grads = iter(torch.autograd.grad(_gate(ctx.se, m_), [m_, *want], ds.view(B, C, 1, 1).to(s.dtype)))
        dm = next(grads)
        grad_x = torch.addcmul(dm / (H * W), g, s) if ctx.needs_input_grad[2] else None
        grad_params = [next(grads) if need else None for need in ctx.needs_input_grad[3:]]
        return (None, None, grad_x, *grad_params)
