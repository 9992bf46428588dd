"""Triton kernels of :mod:`overlock.ops.depthwise_triton` (a module of their own: importing Triton costs time,
so it is imported only when the kernels are asked for).

Tile sizes are autotuned per shape on the GPU (short timings: a first training step tunes all of OverLoCK's
shapes in seconds); Triton's CPU interpreter (the tests) cannot time kernels, so there the first option runs.
"""
import os

import triton
import triton.language as tl


def _options(configs):
    return configs[:1] if os.environ.get("TRITON_INTERPRET") == "1" else configs


def _bench(kernel_call, quantiles):
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


ALL_FORWARD_CONFIGS = [
    triton.Config(dict(BH=8, BW=8, BC=32), num_warps=4),
    triton.Config(dict(BH=8, BW=16, BC=32), num_warps=4),
    triton.Config(dict(BH=16, BW=16, BC=32), num_warps=8),
    triton.Config(dict(BH=4, BW=16, BC=64), num_warps=4),
    triton.Config(dict(BH=8, BW=8, BC=64), num_warps=4),
    triton.Config(dict(BH=16, BW=8, BC=16), num_warps=4),
]
ALL_WEIGHT_GRAD_CONFIGS = [
    triton.Config(dict(BP=64, BC=32), num_warps=4),
    triton.Config(dict(BP=128, BC=32), num_warps=4),
    triton.Config(dict(BP=64, BC=64), num_warps=4),
    triton.Config(dict(BP=32, BC=32), num_warps=2),
    triton.Config(dict(BP=128, BC=64), num_warps=8),
]
MAX_BP = 128  # pixel splits are multiples of every BP above


@triton.autotune(configs=_options(ALL_FORWARD_CONFIGS), key=["H", "W", "C", "KH", "KW", "DIL"], do_bench=_bench)
@triton.jit
def dw_forward(x_ptr, w_ptr, b_ptr, y_ptr, H, W, C, KH, KW, PH, PW, DIL,
               HAS_BIAS: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BC: tl.constexpr):
    """y[n, h, w, c] = b[c] + sum_{ky, kx} x[n, h + ky*DIL - PH, w + kx*DIL - PW, c] * w[ky, kx, c]."""
    pid = tl.program_id(0)
    n = tl.program_id(2)
    tiles_w = tl.cdiv(W, BW)
    th = pid // tiles_w
    tw = pid % tiles_w
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = c < C
    p = tl.arange(0, BH * BW)
    oh = th * BH + p // BW
    ow = tw * BW + p % BW
    omask = (oh < H) & (ow < W)
    acc = tl.zeros((BH * BW, BC), dtype=tl.float32)
    base = x_ptr + n.to(tl.int64) * H * W * C
    for ky in range(0, KH):
        ih = oh + ky * DIL - PH
        hmask = (ih >= 0) & (ih < H) & omask
        for kx in range(0, KW):
            iw = ow + kx * DIL - PW
            m = hmask & (iw >= 0) & (iw < W)
            xv = tl.load(base + ((ih * W + iw) * C)[:, None] + c[None, :], mask=m[:, None] & cmask[None, :],
                         other=0.0)
            wv = tl.load(w_ptr + (ky * KW + kx) * C + c, mask=cmask, other=0.0)
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + n.to(tl.int64) * H * W * C + ((oh * W + ow) * C)[:, None] + c[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=omask[:, None] & cmask[None, :])


@triton.autotune(configs=_options(ALL_WEIGHT_GRAD_CONFIGS), key=["N", "H", "W", "C", "KH", "KW", "DIL"], do_bench=_bench)
@triton.jit
def dw_weight_grad(x_ptr, g_ptr, part_ptr, N, H, W, C, KH, KW, PH, PW, DIL, PIXELS_PER_SPLIT,
                   BP: tl.constexpr, BC: tl.constexpr):
    """part[s, tap, c] = sum over split s's pixels (n, h, w) of x[n, h + ky*DIL - PH, w + kx*DIL - PW, c] * g."""
    tap = tl.program_id(0)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    s = tl.program_id(2)
    cmask = c < C
    ky = tap // KW
    kx = tap % KW
    total = N * H * W
    acc = tl.zeros((BC,), dtype=tl.float32)
    start = s * PIXELS_PER_SPLIT
    for p0 in range(start, start + PIXELS_PER_SPLIT, BP):
        q = p0 + tl.arange(0, BP)
        qmask = (q < total) & (q < start + PIXELS_PER_SPLIT)
        n = q // (H * W)
        hw = q % (H * W)
        h = hw // W
        w = hw % W
        ih = h + ky * DIL - PH
        iw = w + kx * DIL - PW
        m = qmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        gv = tl.load(g_ptr + (q.to(tl.int64) * C)[:, None] + c[None, :], mask=qmask[:, None] & cmask[None, :],
                     other=0.0)
        src = (n.to(tl.int64) * H * W + ih * W + iw) * C
        xv = tl.load(x_ptr + src[:, None] + c[None, :], mask=m[:, None] & cmask[None, :], other=0.0)
        acc += tl.sum(xv.to(tl.float32) * gv.to(tl.float32), axis=0)
    tl.store(part_ptr + (s * tl.num_programs(0) + tap) * C + c, acc, mask=cmask)
