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

Dilated convs (the re-parameterizable blocks' branches) on channels_last CPU maps: PyTorch's backward of a
dilated depthwise conv is 2-4x slower than that of an undilated one, and its forward several times slower for
wide reaches (3x3 dilation 7, 9x9 dilation 2). A conv with dilation ``d`` is an undilated conv on the ``d*d``
sub-maps ``x[:, :, r::d, s::d]`` (:func:`grid_split`), so the backward (and the forward of wide reaches) runs
there: 1.5 s of a 9.4 s single-thread overlock_t training step (b8, 224) went to dilated convs.

On the CPUs listed in ``native.NATIVE_ISAS`` (AVX2, AVX-512), the forward, the input gradient (the forward conv of
``dY`` with the kernel turned 180 degrees) and the weight gradient run in hand-written kernels
(:mod:`overlock.ops.native`) wherever they apply; PyTorch's kernels everywhere else. Dilated convs run there too,
directly on the map (weight gradient included, any kernel size): no sub-map copies, and an overlock_t training step
(b8, 224, AVX2 EPYC) 4.85 -> 4.36 s; the sub-map route stays for the other CPUs.

On GPUs, ``OVERLOCK_GPU_DEPTHWISE=triton`` runs every same-size depthwise conv in Triton kernels
(:mod:`overlock.ops.depthwise_triton`; opt-in until measured: cuDNN's channels_last bf16 kernels are slow for
large and dilated kernels).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import depthwise_triton, native

__all__ = ["depthwise_conv2d", "depthwise_weight_grad", "grid_split", "grid_merge", "runs_native", "native_grads"]

MIN_TAPS = 5  # kernels narrower than this keep PyTorch's weight gradient where the hand-written ones do not run


def depthwise_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, kernel: Tuple[int, int],
                          padding: Tuple[int, int], dilation: int = 1) -> torch.Tensor:
    """``dW`` (shape ``(C, 1, kh, kw)``) of a stride-1 depthwise conv, as one forward depthwise conv (see module)."""
    B, C, H, W = x.shape
    ph, pw = padding
    # zero-padded NCHW copy of x in one pass (F.pad of a channels_last map, then reshape, copies it twice)
    xp = x.new_zeros(1, B * C, H + 2 * ph, W + 2 * pw)
    xp.view(B, C, H + 2 * ph, W + 2 * pw)[:, :, ph:ph + H, pw:pw + W] = x
    g = grad_out.reshape(B * C, 1, grad_out.shape[2], grad_out.shape[3])
    out = F.conv2d(xp, g, stride=dilation, groups=B * C)  # (1, B*C, 2*ph/d + 1, 2*pw/d + 1)
    return out.reshape(B, C, *kernel).sum(0).unsqueeze(1)


class _DepthwiseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, padding, dilation):
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.dilation, ctx.has_bias = padding, dilation, bias is not None
        return _forward(x, weight, bias, padding, dilation)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        d = ctx.dilation
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = _input_grad(grad_out, weight, ctx.padding, d) if need_x else None
        grad_w = _weight_grad(x, grad_out, weight, ctx.padding, d) if need_w else None
        grad_b = None
        if (need_x and grad_x is None) or (need_w and grad_w is None):
            grad_x_aten, grad_w_aten = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, [1, 1], list(ctx.padding), [d, d], False, [0, 0], weight.shape[0],
                [need_x and grad_x is None, need_w and grad_w is None, False])[:2]
            grad_x = grad_x if grad_x is not None else grad_x_aten
            grad_w = grad_w if grad_w is not None else grad_w_aten
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


def _weight_grad(x: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor, padding, dilation: int
                 ) -> Optional[torch.Tensor]:
    """``dW``: by the hand-written kernel where it runs this conv (any kernel size), else as one depthwise conv for
    kernels of ``MIN_TAPS`` or more; ``None`` for small kernels elsewhere (PyTorch's backward is fast there)."""
    kernel = tuple(weight.shape[-2:])
    native_here = _use_native(x, weight, padding, dilation)
    if max(kernel) < MIN_TAPS and not native_here:
        return None
    grad_w = native.depthwise_weight_grad_same(x, grad_out, kernel, dilation) if native_here else None
    if grad_w is None:
        grad_w = depthwise_weight_grad(x, grad_out, kernel, padding, dilation)
    return grad_w.to(weight.dtype)


def _input_grad(grad_out: torch.Tensor, weight: torch.Tensor, padding, dilation: int) -> Optional[torch.Tensor]:
    """``dX`` of a stride-1 same-size depthwise conv by the hand-written forward: the conv of ``dY`` with the
    kernel turned 180 degrees (same dilation). ``None`` where that kernel is not used (then PyTorch's backward
    runs)."""
    if not _use_native(grad_out, weight, padding, dilation):
        return None
    return native.depthwise_conv2d_same(grad_out, weight, None, dilation, flip=True)


def native_grads(x: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor, padding, dilation: int,
                 need_x: bool = True, need_w: bool = True):
    """``(grad_x, grad_weight)`` of a stride-1 same-size depthwise conv (no bias) straight from the hand-written
    kernels, without building an autograd graph (``None`` for a gradient not asked for); ``None`` where those
    kernels do not run this conv (:func:`runs_native`). For backward passes that rebuild the conv themselves."""
    if not _use_native(x, weight, padding, dilation):
        return None
    grad_x = native.depthwise_conv2d_same(grad_out, weight, None, dilation, flip=True) if need_x else None
    grad_w = (native.depthwise_weight_grad_same(x, grad_out, tuple(weight.shape[-2:]), dilation)
              if need_w else None)
    if (need_x and grad_x is None) or (need_w and grad_w is None):
        return None
    return grad_x, grad_w


def grid_split(x: torch.Tensor, d: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B*d*d, C, h, w)`` (channels_last), ``h = ceil(H / d)``, ``w = ceil(W / d)``.

    Pixel ``(a*d + r, b*d + s)`` of ``x`` becomes pixel ``(a, b)`` of sub-map ``(r, s)`` (sample index
    ``(B, r, s)``, row-major); sub-map pixels past the border of ``x`` are zero. A conv with dilation ``d`` on
    ``x`` is a conv with dilation 1 on the sub-maps (its taps step from one sub-map pixel to the next), and the
    zeros are the padding it would have read. One copy of ``x`` (plus zeroing the sub-map pixels past the border
    when ``d`` does not divide the map).
    """
    B, C, H, W = x.shape
    h, w = -(-H // d), -(-W // d)
    hf, wf, rh, rw = H // d, W // d, H % d, W % d
    xv = x.permute(0, 2, 3, 1)  # NHWC view
    out = x.new_empty(B, d, d, h, w, C)
    o = out.permute(0, 3, 1, 4, 2, 5)  # (B, h, d, w, d, C): o[:, a, r, b, s] is x pixel (a*d + r, b*d + s)
    if rh:  # the sub-map pixels past the bottom and right borders, zeroed (only those: the rest is copied over)
        o[:, hf, rh:].zero_()
    if rw:
        o[:, :, :, wf, rw:].zero_()
    o[:, :hf, :, :wf].copy_(xv[:, :hf * d, :wf * d].unflatten(1, (hf, d)).unflatten(3, (wf, d)))
    if rh:
        o[:, hf, :rh, :wf].copy_(xv[:, hf * d:, :wf * d].unflatten(2, (wf, d)))
    if rw:
        o[:, :hf, :, wf, :rw].copy_(xv[:, :hf * d, wf * d:].unflatten(1, (hf, d)))
    if rh and rw:
        o[:, hf, :rh, wf, :rw].copy_(xv[:, hf * d:, wf * d:])
    return out.view(B * d * d, h, w, C).permute(0, 3, 1, 2)


def grid_merge(y: torch.Tensor, d: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`grid_split`: ``(B*d*d, C, h, w)`` sub-maps -> ``(B, C, height, width)`` channels_last."""
    n, C, h, w = y.shape
    B = n // (d * d)
    H, W = height, width
    hf, wf, rh, rw = H // d, W // d, H % d, W % d
    yv = y.permute(0, 2, 3, 1).reshape(B, d, d, h, w, C).permute(0, 3, 1, 4, 2, 5)  # (B, h, d, w, d, C)
    out = y.new_empty(B, H, W, C)
    out[:, :hf * d, :wf * d].unflatten(1, (hf, d)).unflatten(3, (wf, d)).copy_(yv[:, :hf, :, :wf])
    if rh:
        out[:, hf * d:, :wf * d].unflatten(2, (wf, d)).copy_(yv[:, hf, :rh, :wf])
    if rw:
        out[:, :hf * d, wf * d:].unflatten(1, (hf, d)).copy_(yv[:, :hf, :, wf, :rw])
    if rh and rw:
        out[:, hf * d:, wf * d:].copy_(yv[:, hf, :rh, wf, :rw])
    return out.permute(0, 3, 1, 2)


def _grid_conv(xs: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], d: int, height: int,
               width: int) -> torch.Tensor:
    kh, kw = weight.shape[-2:]
    ys = _forward(xs, weight, bias, (kh // 2, kw // 2), 1)
    return grid_merge(ys, d, height, width)


# oneDNN's forward dilated depthwise conv is fast up to a reach (d * (k - 1) + 1 taps wide) that depends on the
# vector ISA, then several times slower: past it oneDNN leaves its depthwise kernel (jit_dw) for a generic one
# (AVX-512: jit, 9x9 dilation 2 on 8x64x56x56 37 ms native, 7 ms as an undilated conv on the sub-maps; AVX2:
# im2col GEMM, 3x3 dilation 5 on 8x256x14x14 6.3 ms native, 0.5 ms on sub-maps). Below it the sub-maps cost
# 2-6x the native conv (the split and merge copies). Figures: benchmarks/README.md.
GRID_FORWARD_SPANS = {"AVX512": 15, "AVX2": 11}
GRID_FORWARD_SPAN = 15  # other ISAs (not measured)


def _grid_forward(x: torch.Tensor, weight: torch.Tensor, dilation: int) -> bool:
    span = GRID_FORWARD_SPANS.get(_cpu_isa(), GRID_FORWARD_SPAN)
    return dilation * (max(weight.shape[-2:]) - 1) + 1 >= span


class _DilatedConv(torch.autograd.Function):
    """Dilated depthwise conv whose backward (and, for wide reaches, forward) runs undilated on sub-maps.

    PyTorch's CPU backward of a dilated depthwise conv is 2-4x slower than that of the undilated conv on the
    :func:`grid_split` sub-maps, copies included; the forward is native unless the reach is wide
    (``GRID_FORWARD_SPAN``). Same products, summed in a different order.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, dilation):
        H, W = x.shape[-2:]
        ctx.size, ctx.dilation, ctx.has_bias = (H, W), dilation, bias is not None
        if _grid_forward(x, weight, dilation):
            xs = grid_split(x, dilation)
            ctx.save_for_backward(xs, weight)
            ctx.split = True
            return _grid_conv(xs, weight, bias, dilation, H, W)
        ctx.save_for_backward(x, weight)
        ctx.split = False
        kh, kw = weight.shape[-2:]
        return F.conv2d(x, weight, bias, padding=(dilation * (kh // 2), dilation * (kw // 2)), dilation=dilation,
                        groups=weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        xs, weight = ctx.saved_tensors
        d = ctx.dilation
        if not ctx.split:
            xs = grid_split(xs, d)
        kh, kw = weight.shape[-2:]
        pad = (kh // 2, kw // 2)
        gs = grid_split(grad_out, d)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_xs = _input_grad(gs, weight, pad, 1) if need_x else None
        grad_w = _weight_grad(xs, gs, weight, pad, 1) if need_w else None
        if (need_x and grad_xs is None) or (need_w and grad_w is None):
            grad_xs_aten, grad_w_aten, _ = torch.ops.aten.convolution_backward(
                gs, xs, weight, None, [1, 1], list(pad), [1, 1], False, [0, 0], weight.shape[0],
                [need_x and grad_xs is None, need_w and grad_w is None, False])
            grad_xs = grad_xs if grad_xs is not None else grad_xs_aten
            grad_w = grad_w if grad_w is not None else grad_w_aten
        grad_x = grid_merge(grad_xs, d, *ctx.size) if need_x else None
        grad_b = grad_out.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def _use_fast_grad(x: torch.Tensor, weight: torch.Tensor, padding, dilation: int) -> bool:
    """Autograd through :class:`_DepthwiseConv`: for the depthwise-form weight gradient (kernels of
    ``MIN_TAPS`` or more), or for the hand-written forward and input gradient (any kernel, where it is used)."""
    return (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad) and x.device.type == "cpu"
            and x.dtype == torch.float32 and weight.dtype == torch.float32 and not _cpu_autocast()
            and ((weight.requires_grad and max(weight.shape[-2:]) >= MIN_TAPS)
                 or _use_native(x, weight, padding, dilation)))


def _same_padding(weight: torch.Tensor, dilation: int) -> Tuple[int, int]:
    return dilation * (weight.shape[-2] // 2), dilation * (weight.shape[-1] // 2)


def _same_size(weight: torch.Tensor, padding, dilation: int) -> bool:
    """Odd kernel, padding that keeps the map size: the convs the Triton kernels take."""
    odd = weight.shape[-2] % 2 == 1 and weight.shape[-1] % 2 == 1
    return odd and tuple(padding) == _same_padding(weight, dilation)


def _use_grid(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Dilated convs on channels_last float32 CPU maps (the layout the sub-maps are cut in; NCHW keeps native)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not _cpu_autocast()
            and not torch.jit.is_scripting() and not torch.jit.is_tracing() and not torch.compiler.is_compiling())


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     padding: Tuple[int, int] = (0, 0), dilation: int = 1) -> torch.Tensor:
    """Stride-1 depthwise ``F.conv2d`` (``groups = channels``), same values and gradients, faster CPU training."""
    if depthwise_triton.enabled(x) and _same_size(weight, padding, dilation) and x.dim() == 4:
        return depthwise_triton.depthwise_conv2d(x, weight, bias, padding, dilation)
    if dilation > 1 and _use_native(x, weight, padding, dilation):  # the hand-written kernels take dilation
        if _records_grad(x, weight, bias):
            return _DepthwiseConv.apply(x, weight, bias, tuple(padding), dilation)
        return _forward(x, weight, bias, padding, dilation)
    if dilation > 1 and tuple(padding) == _same_padding(weight, dilation) and _use_grid(x, weight):
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            return _DilatedConv.apply(x, weight, bias, dilation)
        if _grid_forward(x, weight, dilation):
            return _grid_conv(grid_split(x, dilation), weight, bias, dilation, *x.shape[-2:])
    if _use_fast_grad(x, weight, padding, dilation):
        return _DepthwiseConv.apply(x, weight, bias, tuple(padding), dilation)
    return _forward(x, weight, bias, padding, dilation)


# Kernel sizes whose channels_last float32 forward oneDNN runs several times slower per tap than a larger size, by
# CPU vector ISA: such a kernel is run zero-padded to the larger size (same products: the added taps multiply
# exact zeros). Measured with benchmarks/depthwise_sweep.py; AVX-512 EPYC, 2 threads, 8x128x28x28 (per-tap time
# relative to 15x15: 11x11 1.8x, 13x13 2.9x, 15x15 1.0x), so 13x13 runs as 15x15 (2.1-2.5x faster, every map
# size and batch measured). AVX2 code paths (emulated on that machine: ATEN_CPU_CAPABILITY=avx2,
# ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2): 13x13 is not slow there (0.029 ns/tap against 0.025 at
# 15x15), so no AVX2 entry; re-check on a real AVX2 CPU.
WIDENED_KERNELS = {"AVX512": {13: 15}}


@contextlib.contextmanager
def native_kernel_sizes():
    """Run every kernel at its own size (no widening) in PyTorch's kernels (which a FLOP counter sees): for
    counting the model's multiply-adds."""
    global WIDENED_KERNELS
    saved, WIDENED_KERNELS = WIDENED_KERNELS, {}
    try:
        with native.disabled():
            yield
    finally:
        WIDENED_KERNELS = saved


def _widened(weight: torch.Tensor, x: torch.Tensor, dilation: int) -> int:
    """The kernel size to run ``weight`` at (its own size unless :data:`WIDENED_KERNELS` names it for this CPU)."""
    k = weight.shape[-1]
    if (dilation != 1 or weight.shape[-2] != k or x.device.type != "cpu" or x.dtype != torch.float32
            or not x.is_contiguous(memory_format=torch.channels_last) or _cpu_autocast()
            or torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()):
        return k
    return WIDENED_KERNELS.get(_cpu_isa(), {}).get(k, k)


# Where the hand-written kernels replace oneDNN's: native.NATIVE_ISAS (AVX2, AVX-512).
# Kernels under MIN_TAPS x MIN_TAPS run there only on maps of up to NATIVE_SMALL_KERNEL_PIXELS pixels (height x
# width), or of up to NATIVE_SMALL_KERNEL_VALUES values (channels x height x width): per image, not per batch, so that
# an image gets the same kernels, and bits, alone or in a batch. 3x3 on 1x384x14x14 1.6x faster, on 16x384x14x14
# 0.94-1.19x; on 56x56 maps (overlock_t's first stage at 224) 1x64 52 against 111 us, 8x64 0.37-0.53 against
# 0.46 ms, 1x256 211 against 270 us but 8x256 (25 MB, bound by memory) 4.1-5.2 against 3.6-4.1 ms, and with the
# 256-channel ones native the b8 training step's memory high-water mark rose by 100-200 MB (2-core AVX2 EPYC). Since
# the GRN-MLP's training forward and backward write that conv into kept scratch maps (ops/grn_mlp.py: no page faults,
# which cost more than the kernels' difference on the Xeon VMs) the limit is 256x56x56 in training too; it was that
# already in the fused inference model (batch-1 forward 3.1 ms less, batch 16 5 ms less). Larger maps (dense
# prediction inputs) keep oneDNN's, unmeasured.
# Their weight gradient runs there too (3x3 convs of an overlock_t training step, b8: 42 against 59 ms in PyTorch's).
# Dilated kernels run there at any size, weight gradient included (PyTorch's dilated weight gradient is 4-12x
# slower; benchmarks/README.md).
NATIVE_SMALL_KERNEL_PIXELS = 32 * 32
NATIVE_SMALL_KERNEL_VALUES = 256 * 56 * 56


def _records_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _use_native(x: torch.Tensor, weight: torch.Tensor, padding, dilation: int) -> bool:
    """The hand-written kernel runs this conv (its autograd, if any, is :class:`_DepthwiseConv`'s)."""
    taps = weight.shape[-2] * weight.shape[-1]
    # _native_isa first: it rules out tracing, where the pixel count would be a guard on a symbolic batch size
    return (_native_isa(x) and tuple(padding) == _same_padding(weight, dilation)
            and (taps >= MIN_TAPS ** 2 or dilation > 1 or _small_map(x)))


def _small_map(x: torch.Tensor) -> bool:
    """Small kernels run natively on this map (per image: :data:`NATIVE_SMALL_KERNEL_PIXELS` pixels or
    :data:`NATIVE_SMALL_KERNEL_VALUES` values)."""
    pixels = x.shape[2] * x.shape[3]
    return pixels <= NATIVE_SMALL_KERNEL_PIXELS or pixels * x.shape[1] <= NATIVE_SMALL_KERNEL_VALUES


def runs_native(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding, dilation: int = 1
                ) -> bool:
    """The hand-written forward runs this conv, without autograd (the rule :func:`_forward` follows; the fused
    model's depthwise convs call the kernel directly where it holds)."""
    return _use_native(x, weight, padding, dilation) and not _records_grad(x, weight, bias)


def _native_isa(x: torch.Tensor) -> bool:
    """Real CPU tensors (not traced, compiled, fake or functional) on a CPU where the kernels are used. The
    tracing tests come first: under torch.compile, asking the CPU's ISA would break the graph."""
    return (not torch.jit.is_scripting() and not torch.jit.is_tracing() and not torch.compiler.is_compiling()
            and type(x) is torch.Tensor and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last) and not _cpu_autocast()
            and native.used_here())


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding, dilation: int):
    """The forward: the hand-written kernel where it is faster (``native.NATIVE_ISAS``), else oneDNN's, with a slow
    kernel size zero-padded to a fast one (:data:`WIDENED_KERNELS`)."""
    if runs_native(x, weight, bias, padding, dilation):
        y = native.depthwise_conv2d_same(x, weight, bias, dilation)
        if y is not None:
            return y
    k = weight.shape[-1]
    wide = _widened(weight, x, dilation)
    if wide != k:
        e = (wide - k) // 2
        weight = F.pad(weight, (e, e, e, e)).contiguous(memory_format=torch.channels_last)
        padding = (padding[0] + e, padding[1] + e)
    return F.conv2d(x, weight, bias, padding=padding, dilation=dilation, groups=weight.shape[0])


def _cpu_isa() -> str:
    """The CPU's vector ISA, for the rules about oneDNN's kernels above (tests replace it)."""
    return native.cpu_isa()
