"""GRN-MLP tail for training: ``fc2(GRN(dwconv(GELU(h))))`` with a hand-written backward that reuses buffers.

:func:`overlock.ops.recompute.mlp_tail` keeps only ``h`` and lets autograd differentiate the rebuilt middle ops.
That backward allocates seven maps as large as ``h`` (GELU, conv and GRN outputs, ``fc2``'s input gradient, two
for GRN's input gradient, the conv's input gradient, GELU's input gradient); on the 4x-wide hidden maps of the
first stages (8x256x56x56 at batch 8: 25.7 MB each) every fresh buffer is a fresh mmap whose pages fault in
one by one, which on the project's VMs costs more than the arithmetic. Here the backward allocates four and
writes the rest in place:

- the GRN input gradient ``g * s + y * t`` overwrites ``fc2``'s input gradient ``g``;
- ``fc2``'s weight gradient needs GRN's output ``y * s + beta``: it is rebuilt in the conv output ``y`` once
  GRN's backward no longer needs ``y``;
- GELU's input gradient overwrites the conv's input gradient;
- with the native kernels, GELU's and the conv's outputs in forward, and ``fc2``'s input gradient and the rebuilt
  GELU and conv outputs in backward, go into three scratch maps per shape that every GRN-MLP call of that shape
  takes again, step after step (:func:`_workspace`): no fresh map in forward, one per call in backward (GELU's
  input gradient, which autograd passes on).

GRN's per-(sample, channel) statistics are kept from the forward pass (``B x C`` numbers), so backward does not
reduce over the map again. The forward and every rebuilt value run the very ops of the plain graph (same
kernels, same order), so outputs are bit-identical and gradients agree to float rounding.
"""
from __future__ import annotations

import collections
import threading

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import gelu as gelu_ops
from . import grn as grn_ops
from . import native

__all__ = ["applies", "grn_mlp_tail", "release_workspace"]


def applies(act: nn.Module, dw: nn.Module, grn: nn.Module, fc2: nn.Module, h: torch.Tensor) -> bool:
    """The layers are the stock GRN-MLP ones (overlock's ``GELU``, residual 3x3 depthwise conv, GRN, 1x1 conv) and
    ``h`` is a float32/float64 map outside autocast (mixed precision keeps the generic recomputation)."""
    from ..layers import GRN, PointwiseConv, ResDWConv  # layers imports this module
    return (type(act) is gelu_ops.GELU and type(dw) is ResDWConv and type(grn) is GRN and type(fc2) is PointwiseConv
            and h.dim() == 4 and h.dtype in (torch.float32, torch.float64) and grn_ops.fast_path(h)
            and not torch.is_autocast_enabled(h.device.type))


def grn_mlp_tail(act: nn.GELU, dw: nn.Module, grn: nn.Module, fc2: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``fc2(grn(dw(act(h))))`` keeping ``h`` and GRN's ``B x C`` statistics for backward (see module docstring)."""
    return _GrnMlpTail.apply(act, dw, grn, fc2, h, dw.weight, dw.bias, grn.gamma, grn.beta, fc2.weight, fc2.bias)


class _GrnMlpTail(torch.autograd.Function):
    @staticmethod
    def forward(ctx, act, dw, grn, fc2, h, dw_weight, dw_bias, gamma, beta, fc2_weight, fc2_bias):
        ctx.act, ctx.dw, ctx.fc2 = act, dw, fc2
        B, C = h.shape[:2]
        y = _native_forward(act, dw, h)
        if y is None:
            y = dw(act(h))
        stats = grn_ops.stats(y, gamma)
        r = torch.addcmul(beta, y, stats[3].view(B, C, 1, 1), out=y)  # GRN's output, in place of the conv's
        ctx.save_for_backward(h, gamma, beta, fc2_weight, *stats)
        ctx.has_fc2_bias = fc2_bias is not None
        return fc2(r)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        h, gamma, beta, fc2_weight, *stats = ctx.saved_tensors
        need = ctx.needs_input_grad
        dw = ctx.dw
        B, C, H, W = h.shape
        cout = fc2_weight.shape[0]
        # fc2's input gradient, as a map laid out like fc2's output gradient (channels innermost)
        g2 = grad.permute(0, 2, 3, 1).reshape(-1, cout)
        if need[4] and _native_tail(dw, h, ctx.act.approximate):
            gr = _workspace(h, 0)
            torch.mm(g2, fc2_weight.reshape(cout, C), out=gr.permute(0, 2, 3, 1).view(-1, C))
            return _native_backward(ctx, g2, gr, h, gamma, beta, stats)
        gr = g2.mm(fc2_weight.reshape(cout, C)).view(B, H, W, C).permute(0, 3, 1, 2)

        # rebuild the conv input and output, with the conv's graph for its own backward
        need_a, need_dw = need[4], need[5] or need[6]
        with torch.enable_grad():
            a = gelu_ops.gelu(h.detach(), ctx.act.approximate).detach().requires_grad_(need_a)
            y = dw(a)
        y_ = y.detach()

        # GRN's backward, its input gradient written over gr; fc2's weight gradient needs GRN's output, rebuilt
        # in y's buffer as GRN's backward finishes with y (in the same pass on CPU)
        grad_y, grad_gamma, grad_beta = grn_ops.backward(gr, y_, gamma, stats, (True, need[7], need[8]),
                                                         in_place=True, output_beta=beta if need[9] else None)
        grad_w2, grad_b2 = _fc2_grads(ctx, g2, y_)
        del y_

        # the conv's backward (its own autograd: same kernels as the plain graph), then GELU's in place
        inputs = [t for t, n in ((a, need_a), (dw.weight, need[5]), (dw.bias, need[6])) if n]
        got = iter(torch.autograd.grad(y, inputs, grad_y) if inputs else ())
        grad_a = next(got) if need_a else None
        grad_dw_w = next(got) if need[5] else None
        grad_dw_b = next(got) if need[6] else None
        del y, a
        grad_h = None
        if need_a:
            grad_h = gelu_ops.gelu_backward(grad_a, h, ctx.act.approximate, out=grad_a)
        return (None, None, None, None, grad_h, grad_dw_w, grad_dw_b, grad_gamma, grad_beta, grad_w2, grad_b2)


# Scratch maps of the native path (GELU's and the conv's outputs in forward; fc2's input gradient, the rebuilt GELU
# and conv outputs in backward), kept per shape from one GRN-MLP call to the next and from step to step. A fresh
# map-sized buffer comes from memory the allocator has just returned to the OS, and every page of it faults in again:
# on the project's VMs 1-7 us a fault, 6272 faults per 25.7 MB map (8x256x56x56); the stage-1 conv of a GRN-MLP took
# 27 ms a call on average in a b8 training step against 3.5 ms for one that did not fault. Three maps per shape
# (slots 0-2: forward uses 1 and 2, backward 0-2; the two never overlap). When a backward pass ends, the maps its
# step did not use are let go (another batch size, another model); at most _MAX_MAPS are kept. Per thread.
_MAX_MAPS = 24
_pool = threading.local()


def _maps() -> "collections.OrderedDict":
    maps = getattr(_pool, "maps", None)
    if maps is None:
        maps = _pool.maps = collections.OrderedDict()
        _pool.used, _pool.armed = set(), False
    return maps


def _end_of_pass() -> None:
    """A backward pass ended (autograd's final callback): keep the maps used since the last one ended."""
    maps = _maps()
    for key in [k for k in maps if k not in _pool.used]:
        del maps[key]
    _pool.used, _pool.armed = set(), False


def release_workspace() -> None:
    """Let go of every scratch map this thread keeps (a training run is over and the process goes on)."""
    _pool.maps = None


def _workspace(like: torch.Tensor, slot: int) -> torch.Tensor:
    """A channels_last map shaped like ``like`` for scratch ``slot``. Inside a backward pass, the first call asks
    autograd to prune the maps when the pass ends (:func:`_end_of_pass`)."""
    maps = _maps()
    if not _pool.armed:
        try:
            torch.autograd.Variable._execution_engine.queue_callback(_end_of_pass)
            _pool.armed = True
        except (AttributeError, RuntimeError):  # not inside autograd's engine (forward), or no such hook
            pass
    key = (tuple(like.shape), like.dtype, like.device, slot)
    buf = maps.pop(key, None)
    if buf is None:
        buf = torch.empty_like(like, memory_format=torch.channels_last)
    maps[key] = buf  # most recently used last
    _pool.used.add(key)
    while len(maps) > _MAX_MAPS:
        maps.popitem(last=False)
    return buf


def _native_forward(act: nn.Module, dw: nn.Module, h: torch.Tensor):
    """``dw(act(h))`` by the kernels the modules run (same bits), GELU's and the conv's outputs written into
    scratch maps: both die with this call (GRN's output is written over the conv's, then fc2 reads it). ``None``
    where :func:`_native_tail` does not hold or a hook must see the modules' calls."""
    from ..fused import _hooked  # fused imports the layers, which import this module
    from ..layers import depthwise_conv_into
    if not _native_tail(dw, h, act.approximate) or _hooked(act, dw):
        return None
    a = native.gelu(h, out=_workspace(h, 1))
    if a is None:
        return None
    y = _workspace(h, 2)
    return y if depthwise_conv_into(a, dw.residual_weight(), 1, y, dw.bias) else dw(a)


def _native_tail(dw: nn.Module, h: torch.Tensor, approximate: str) -> bool:
    """The conv's gradients and GELU's come from the hand-written kernels: a 3x3-or-smaller undilated conv that
    no map side crops, on a float32 channels_last map, with the native exact GELU."""
    kh, kw = dw.kernel_size
    return (kh * kw <= 9 and dw.dilation == (1, 1) and h.shape[2] > kh // 2 and h.shape[3] > kw // 2
            and h.shape[1] % 8 == 0 and h.is_contiguous(memory_format=torch.channels_last)
            and gelu_ops.native_applies(h, approximate))


def _native_backward(ctx, g2, gr, h, gamma, beta, stats):
    """:meth:`_GrnMlpTail.backward` where :func:`_native_tail` holds: the conv is rebuilt without a graph, and its
    input gradient comes out of one pass with GELU's backward folded in (``native.depthwise_gelu_grad``), written
    over the buffer of the rebuilt conv once ``fc2``'s weight gradient no longer needs it: three map-sized
    buffers instead of four, one pass fewer."""
    from ..layers import depthwise_conv_into  # layers imports this module
    need = ctx.needs_input_grad
    dw = ctx.dw
    with torch.no_grad():
        a = native.gelu(h, out=_workspace(h, 1))  # the kernel gelu_ops.gelu runs here (_native_tail)
        if a is None:
            a = gelu_ops.gelu(h, ctx.act.approximate)
        weight = dw.residual_weight()
        scratch = _workspace(h, 2)  # the forward's own kernel: the same bits as there
        y = scratch if depthwise_conv_into(a, weight, 1, scratch, dw.bias) else dw(a)
    grad_y, grad_gamma, grad_beta = grn_ops.backward(gr, y, gamma, stats, (True, need[7], need[8]),
                                                     in_place=True, output_beta=beta if need[9] else None)
    grad_w2, grad_b2 = _fc2_grads(ctx, g2, y)
    grad_h = native.depthwise_gelu_grad(grad_y, weight, h, out=None if y is scratch else y)
    grad_dw_w = native.depthwise_weight_grad_same(a, grad_y, dw.kernel_size) if need[5] else None
    if grad_h is None or (need[5] and grad_dw_w is None):
        raise RuntimeError("overlock: the native GRN-MLP tail backward declined maps that _native_tail accepted")
    grad_dw_b = grad_y.sum((0, 2, 3)) if need[6] else None
    return (None, None, None, None, grad_h, grad_dw_w, grad_dw_b, grad_gamma, grad_beta, grad_w2, grad_b2)


def _fc2_grads(ctx, g2: torch.Tensor, out: torch.Tensor):
    """fc2's weight and bias gradients (each where asked) from its output gradient ``g2`` (pixels x channels) and
    its input ``out`` (GRN's output, rebuilt)."""
    need = ctx.needs_input_grad
    grad_w2 = grad_b2 = None
    if need[9]:
        grad_w2 = g2.t().mm(out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])).view(ctx.fc2.weight.shape)
    if ctx.has_fc2_bias and need[10]:
        grad_b2 = g2.sum(0)
    return grad_w2, grad_b2
