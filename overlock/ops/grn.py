"""Global Response Normalization with a hand-written backward and cache-sized spatial reductions.

``GRN(x) = beta + x * (gamma * nx + 1)``, ``nx = gx / (mean_c(gx) + 1e-6)``, ``gx`` = each channel's spatial L2
norm. Autograd runs this as about six passes over the map in backward (two products for ``addcmul``, the norm's
``x * g / gx``, their sum, ...), and ``torch.linalg.vector_norm`` over the two spatial dims of a channels_last
map is slow on CPU (14 ms against 2 ms for a sum of squares, 8x256x56x56, one thread). Here:

- spatial sums (``sum_hw x^2`` forward, ``sum_hw g * x`` backward) run per chunk of samples on the NHWC view, so
  the elementwise product stays in cache (and, in float32, is more accurate than ``vector_norm``);
- backward is ``dx = g * s + x * t`` with per-(sample, channel) ``s`` and ``t``: two passes.

Same function and gradients as the autograd graph of :class:`overlock.layers.GRN` (``vector_norm``'s gradient
convention included: 0, not NaN, for an all-zero channel map).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import native

__all__ = ["grn", "spatial_dot", "stats", "backward", "fast_path"]

EPS = 1e-6
CHUNK_ELEMS = 1 << 20  # samples per chunk: about 4 MB of float32 products at a time


def spatial_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum((2, 3))``, shape ``(B, C)``, without a map-sized temporary for channels_last maps."""
    B, C, H, W = a.shape
    cl = torch.channels_last
    if not (a.is_contiguous(memory_format=cl) and b.is_contiguous(memory_format=cl)) or B == 1:
        return (a * b).sum((2, 3)) if a is not b else a.square().sum((2, 3))
    av = a.permute(0, 2, 3, 1).reshape(B, H * W, C)
    bv = av if b is a else b.permute(0, 2, 3, 1).reshape(B, H * W, C)
    out = a.new_empty(B, C)
    step = max(1, CHUNK_ELEMS // max(1, H * W * C))
    for i in range(0, B, step):
        j = min(B, i + step)
        torch.sum(av[i:j] * bv[i:j], 1, out=out[i:j])
    return out


def _scale(gx: torch.Tensor, gamma: torch.Tensor):
    """``m = mean_c(gx) + eps``, ``nx = gx / m`` and ``s = gamma * nx + 1`` (all ``(B, C)``)."""
    m = gx.mean(dim=1, keepdim=True) + EPS
    nx = gx / m
    return m, nx, torch.addcmul(torch.ones_like(nx), gamma.view(1, -1), nx)


def _sum_squares(x: torch.Tensor) -> torch.Tensor:
    """``(x * x).sum((2, 3))`` without autograd: the native kernel where it runs, else :func:`spatial_dot`."""
    sq = native.grn_sum_squares(x) if native.used_here() and not torch.is_grad_enabled() else None
    return sq if sq is not None else spatial_dot(x, x)


def stats(x: torch.Tensor, gamma: torch.Tensor):
    """``(gx, m, nx, s)``: the per-(sample, channel) numbers GRN's forward computes and its backward needs (the sums
    of squares in one native pass on float32 channels_last CPU maps)."""
    gx = _sum_squares(x).sqrt_()
    return (gx, *_scale(gx, gamma))


def backward(g: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor, st, needs, in_place: bool = False,
             output_beta: torch.Tensor | None = None):
    """``(grad_x, grad_gamma, grad_beta)`` of GRN from the output gradient ``g`` and :func:`stats` ``st``; each
    computed only where ``needs`` (three flags) says. ``in_place``: ``grad_x`` is written over ``g``.

    ``output_beta`` (with ``in_place``): ``x`` is then overwritten with GRN's output ``x * s + output_beta``, which
    a following layer's weight gradient needs. On float32 channels_last CPU maps the whole backward is two native
    passes over ``g`` and ``x`` (``native.grn_backward_sums`` / ``grn_backward_apply``)."""
    gx, m, nx, s = st
    B, C = x.shape[:2]
    fused = native.grn_backward_sums(g, x) if in_place and native.used_here() else None
    if fused is not None:
        ds, gs = fused
        grad_beta = gs.sum(0).view_as(gamma) if needs[2] else None
    else:
        ds = spatial_dot(g, x)  # d loss / d s
        grad_beta = g.sum((0, 2, 3)).view_as(gamma) if needs[2] else None
    grad_gamma = (ds * nx).sum(0).view_as(gamma) if needs[1] else None
    grad_x = t = None
    if needs[0]:
        dnx = ds * gamma.view(1, -1)
        # nx = gx / m, m = mean_c(gx) + eps
        dgx = dnx / m - (dnx * gx).sum(1, keepdim=True) / (m * m * C)
        # gx = ||x||: d gx / d x = x / gx (0 where gx == 0, as vector_norm's backward)
        t = (dgx / gx).masked_fill_(gx == 0, 0)
    if fused is not None and (needs[0] or output_beta is not None) and native.grn_backward_apply(
            g, x, s, t if t is not None else torch.zeros_like(s), output_beta):
        return (g if needs[0] else None), grad_gamma, grad_beta
    if needs[0]:
        grad_x = g.mul_(s.view(B, C, 1, 1)) if in_place else torch.mul(g, s.view(B, C, 1, 1))
        grad_x.addcmul_(x, t.view(B, C, 1, 1))
    if output_beta is not None:
        torch.addcmul(output_beta.view(1, C, 1, 1), x, s.view(B, C, 1, 1), out=x)
    return grad_x, grad_gamma, grad_beta


class _Grn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gamma, beta):
        B, C = x.shape[:2]
        st = stats(x, gamma)
        ctx.save_for_backward(x, gamma, *st)
        return torch.addcmul(beta, x, st[3].view(B, C, 1, 1))

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, gamma, *st = ctx.saved_tensors
        g = g.contiguous(memory_format=torch.channels_last) if x.is_contiguous(memory_format=torch.channels_last) \
            else g.contiguous()
        return backward(g, x, gamma, st, ctx.needs_input_grad)


def fast_path(x: torch.Tensor) -> bool:
    """Eager float32/float64 maps (not under torch.compile / tracing / scripting, which see the plain graph;
    half-precision maps keep ``vector_norm``, which autocast runs in float32)."""
    return (x.dim() == 4 and x.dtype in (torch.float32, torch.float64) and not torch.jit.is_scripting()
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling())


def grn(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``beta + x * (gamma * nx + 1)`` (GRN) with the fast reductions and, under autograd, the fused backward."""
    B, C = x.shape[:2]
    if torch.is_grad_enabled() and (x.requires_grad or gamma.requires_grad or beta.requires_grad):
        return _Grn.apply(x, gamma, beta)
    gx = _sum_squares(x).sqrt_()
    return torch.addcmul(beta, x, _scale(gx, gamma)[2].view(B, C, 1, 1))
