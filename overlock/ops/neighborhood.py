"""2-D neighbourhood aggregation (NATTEN's ``na2d_av``) and its relative position bias, in plain PyTorch.

Every pixel ``(i, j)`` of an ``H x W`` map owns a ``k x k`` window of neighbours. Following NATTEN, the
window is centred on the pixel when possible and *shifted* to stay inside the map near a border (never
zero-padded): along an axis of length ``L`` the window starts at ``clamp(i - k // 2, 0, L - k)``.
Hence every map side must be at least ``k``.

``attn`` has shape ``(B, G, H, W, k*k)`` (row-major window offsets) and ``value`` ``(B, G, H, W, C)``;
the result is ``out[b, g, i, j] = sum_a attn[b, g, i, j, a] * value[b, g, nbr(i, j, a)]``.

Backends, all computing the same function:

- ``naive``: explicit loops over pixels. Obviously correct, slow; the yardstick for the tests.
- ``unfold``: what the official code does without natten (``F.unfold`` of the values, replicate padding,
  one einsum). Materialises ``k*k`` copies of the values; kept to measure the official method in-project.
- ``tiled``: the fast path (without autograd, :func:`na2d_softmax_av` also takes the softmax per sample).
  The output is cut into tiles; the neighbours of a tile lie in a region of
  ``(t + k - 1)^2`` pixels, so each tile is one dense, masked matmul (the scattered softmax weights times
  the region's values). A map that fits in one tile needs no gather at all. Cost is linear in pixels.
"""
from __future__ import annotations

import functools

import math
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "window_starts",
    "neighbor_index",
    "rpb_index",
    "na2d_av",
    "na2d_av_naive",
    "na2d_av_unfold",
    "na2d_av_tiled",
    "na2d_softmax_av",
    "BACKENDS",
]


def _check_size(height: int, width: int, kernel_size: int) -> None:
    if kernel_size % 2 != 1:
        raise ValueError(f"neighbourhood kernel_size must be odd, got {kernel_size}")
    if height < kernel_size or width < kernel_size:
        raise ValueError(
            f"neighbourhood aggregation needs a map of at least {kernel_size}x{kernel_size}, got {height}x{width} "
            "(ContMix resizes smaller maps up before aggregating)")


def window_starts(length: int, kernel_size: int, device=None) -> torch.Tensor:
    """First neighbour of each position along one axis (NATTEN's border rule)."""
    pos = torch.arange(length, device=device)
    return (pos - kernel_size // 2).clamp(0, length - kernel_size)


def _axis_neighbors(length: int, kernel_size: int, device=None) -> torch.Tensor:
    """``(length, k)`` absolute neighbour positions along one axis."""
    return window_starts(length, kernel_size, device)[:, None] + torch.arange(kernel_size, device=device)


def neighbor_index(height: int, width: int, kernel_size: int, device=None) -> torch.Tensor:
    """``(H*W, k*k)`` flat index of each pixel's neighbours, window offsets row-major."""
    _check_size(height, width, kernel_size)
    nh = _axis_neighbors(height, kernel_size, device)  # (H, k)
    nw = _axis_neighbors(width, kernel_size, device)  # (W, k)
    idx = nh[:, None, :, None] * width + nw[None, :, None, :]  # (H, W, k, k)
    return idx.reshape(height * width, kernel_size * kernel_size)


def _normal_tensors(fn):
    """Build cached index tensors outside inference mode: inference tensors in the cache would break a later
    training step (autograd refuses to save them for backward)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False):
            return fn(*args, **kwargs)
    return wrapper


@_normal_tensors
def rpb_index(height: int, width: int, kernel_size: int, device=None) -> torch.Tensor:
    """``(H*W, k*k)`` index into a flattened ``(2k-1, 2k-1)`` bias table: offset ``nbr - pixel + k - 1``."""
    key = ("rpb", height, width, kernel_size, str(device))
    idx = _PLAN_CACHE.get(key)
    if idx is None:
        idx = _rpb_index(height, width, kernel_size, device)
        if not torch.compiler.is_compiling():
            _PLAN_CACHE[key] = idx
    return idx


def _rpb_index(height: int, width: int, kernel_size: int, device=None) -> torch.Tensor:
    _check_size(height, width, kernel_size)
    span = 2 * kernel_size - 1

    def axis(length):
        pos = torch.arange(length, device=device)
        return _axis_neighbors(length, kernel_size, device) - pos[:, None] + kernel_size - 1  # (L, k)

    rh, rw = axis(height), axis(width)
    idx = rh[:, None, :, None] * span + rw[None, :, None, :]
    return idx.reshape(height * width, kernel_size * kernel_size)


_PLAN_CACHE: Dict[Tuple, object] = {}


# ---------------------------------------------------------------------------------------------------------------
# naive reference
# ---------------------------------------------------------------------------------------------------------------

def na2d_av_naive(attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Loop over every pixel and window offset; the definition, used to check the other backends."""
    B, G, H, W, C = value.shape
    _check_size(H, W, kernel_size)
    k = kernel_size
    starts_h = window_starts(H, k).tolist()
    starts_w = window_starts(W, k).tolist()
    out = value.new_zeros(B, G, H, W, C)
    for i in range(H):
        for j in range(W):
            sh, sw = starts_h[i], starts_w[j]
            window = value[:, :, sh:sh + k, sw:sw + k, :].reshape(B, G, k * k, C)
            out[:, :, i, j] = torch.einsum("bga,bgac->bgc", attn[:, :, i, j], window)
    return out


# ---------------------------------------------------------------------------------------------------------------
# official natten-free method
# ---------------------------------------------------------------------------------------------------------------

def na2d_av_unfold(attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The official fallback: unfold the valid windows, replicate-pad them to the map, contract."""
    B, G, H, W, C = value.shape
    _check_size(H, W, kernel_size)
    k, pad = kernel_size, kernel_size // 2
    v = value.permute(0, 1, 4, 2, 3).reshape(B, G * C, H, W)
    v = F.unfold(v, kernel_size=k).reshape(B, G * C * k * k, H - 2 * pad, W - 2 * pad)
    v = F.pad(v, (pad, pad, pad, pad), mode="replicate").reshape(B, G, C, k * k, H, W)
    return torch.einsum("bghwa,bgcahw->bghwc", attn, v)


# ---------------------------------------------------------------------------------------------------------------
# tiled dense matmul (fast path)
# ---------------------------------------------------------------------------------------------------------------

def _tiles(length: int, tile: int, kernel_size: int, device=None):
    """Tile starts, region starts and region length along one axis.

    The last tile is shifted back to end at the border (it may overlap its neighbour), so every tile has
    the same size; its region is the span of its pixels' windows, at most ``tile + k - 1`` long.
    """
    tile = min(tile, length)
    region = min(tile + kernel_size - 1, length)
    n = math.ceil(length / tile)
    t0 = torch.clamp(torch.arange(n, device=device) * tile, max=length - tile)
    r0 = (t0 - kernel_size // 2).clamp(0, length - region)
    return tile, region, t0, r0


@_normal_tensors
def _tiled_plan(height: int, width: int, kernel_size: int, tile: int, device):
    """Index tensors for the tiled aggregation (cached per shape and device)."""
    key = (height, width, kernel_size, tile, str(device))
    plan = _PLAN_CACHE.get(key)
    if plan is not None:
        return plan
    k = kernel_size
    th, rh, t0h, r0h = _tiles(height, tile, k, device)
    tw, rw, t0w, r0w = _tiles(width, tile, k, device)
    nth, ntw = t0h.numel(), t0w.numel()
    # absolute rows/cols of each tile's pixels and of each region
    pix_h = t0h[:, None] + torch.arange(th, device=device)  # (nth, th)
    pix_w = t0w[:, None] + torch.arange(tw, device=device)
    reg_h = r0h[:, None] + torch.arange(rh, device=device)  # (nth, rh)
    reg_w = r0w[:, None] + torch.arange(rw, device=device)
    # neighbours of each tile pixel, relative to its region
    nb_h = _axis_neighbors(height, k, device)[pix_h] - r0h[:, None, None]  # (nth, th, k)
    nb_w = _axis_neighbors(width, k, device)[pix_w] - r0w[:, None, None]
    local = (nb_h[:, None, :, None, :, None] * rw + nb_w[None, :, None, :, None, :])  # (nth,ntw,th,tw,k,k)
    local = local.reshape(nth * ntw, th * tw, k * k)
    pix = (pix_h[:, None, :, None] * width + pix_w[None, :, None, :]).reshape(nth * ntw, th * tw)
    reg = (reg_h[:, None, :, None] * width + reg_w[None, :, None, :]).reshape(nth * ntw, rh * rw)
    single = nth * ntw == 1
    # where each pixel's output lives in the flattened (tile, pixel-in-tile) result
    owner = torch.empty(height * width, dtype=torch.long, device=device)
    owner[pix.reshape(-1)] = torch.arange(pix.numel(), device=device)
    plan = (single, pix, reg, local, owner, rh * rw)
    if not torch.compiler.is_compiling():
        _PLAN_CACHE[key] = plan
    return plan


def default_tile(height: int, width: int, kernel_size: int) -> int:
    """One tile when the map is small or not much larger than a window, else tiles of about one kernel."""
    if height * width <= max(4 * kernel_size * kernel_size, 256):
        return max(height, width)
    return max(kernel_size - 1, 8)


DENSE_CHUNK_BYTES = 2 << 20  # dense weight buffer per chunk on CPU: reused while it is in cache
DEVICE_CHUNK_BYTES = 1 << 30  # on GPUs: in effect the whole batch (few large launches beat cache reuse there)


def _pairs_per_chunk(a: torch.Tensor, pairs: int, pixels: int, region: int) -> int:
    """(sample, head) pairs whose dense ``(pixels, region)`` matrices share one buffer."""
    limit = DENSE_CHUNK_BYTES if a.device.type == "cpu" else DEVICE_CHUNK_BYTES
    return max(1, min(pairs, limit // (pixels * region * a.element_size())))


def _single_tile_chunked(a: torch.Tensor, v: torch.Tensor, local: torch.Tensor, region: int) -> torch.Tensor:
    """The one-tile dense matmul over chunks of (sample, head) pairs sharing one reused weight buffer.

    Without autograd nothing needs the dense weights afterwards, so one small buffer is zeroed and reused per
    chunk instead of a whole-batch one (tens of MB of fresh memory, zero-filled, on every call).
    """
    B, G, P, kk = a.shape
    a, v = a.reshape(B * G, P, kk), v.reshape(B * G, P, v.shape[-1])
    n = _pairs_per_chunk(a, B * G, P, region)
    dense = a.new_empty(n, P, region)
    out = v.new_empty(B * G, P, v.shape[-1])
    idx = local.expand(n, -1, -1)
    for s in range(0, B * G, n):
        e = min(s + n, B * G)
        d = dense[:e - s]
        d.zero_().scatter_(-1, idx[:e - s], a[s:e])
        torch.matmul(d, v[s:e], out=out[s:e])
    return out.view(B, G, P, -1)


class _SingleTileAV(torch.autograd.Function):
    """One-tile aggregation whose backward keeps only the weights and values, not the dense weight matrix.

    The dense ``(P, region)`` matrix of each (sample, head) is several times larger than its ``k*k`` weights
    (8x for a 5x5 kernel on a 14x14 map); forward and backward rebuild it per chunk in one reused buffer.
    Gradients: ``dV = D^T dO`` and ``dA = gather(dO V^T)`` (the scatter's backward), as autograd would form them.
    """

    @staticmethod
    def forward(ctx, a, v, local, region):
        ctx.save_for_backward(a, v, local)
        ctx.region = region
        return _single_tile_chunked(a, v, local, region)

    @staticmethod
    def backward(ctx, grad_out):
        a, v, local = ctx.saved_tensors
        B, G, P, kk = a.shape
        C = v.shape[-1]
        a, v = a.reshape(B * G, P, kk), v.reshape(B * G, P, C)
        go = grad_out.reshape(B * G, P, C)
        n = _pairs_per_chunk(a, B * G, P, ctx.region)
        buf = a.new_empty(n, P, ctx.region)
        idx = local.expand(n, -1, -1)
        grad_a = a.new_empty(B * G, P, kk) if ctx.needs_input_grad[0] else None
        grad_v = v.new_empty(B * G, P, C) if ctx.needs_input_grad[1] else None
        for s in range(0, B * G, n):
            e = min(s + n, B * G)
            d = buf[:e - s]
            if grad_v is not None:
                d.zero_().scatter_(-1, idx[:e - s], a[s:e])
                torch.matmul(d.transpose(1, 2), go[s:e], out=grad_v[s:e])
            if grad_a is not None:
                torch.matmul(go[s:e], v[s:e].transpose(1, 2), out=d)
                torch.gather(d, -1, idx[:e - s], out=grad_a[s:e])
        return (grad_a.view(B, G, P, kk) if grad_a is not None else None,
                grad_v.view(B, G, P, C) if grad_v is not None else None, None, None)


def na2d_av_tiled(attn: torch.Tensor, value: torch.Tensor, kernel_size: int, tile: int | None = None) -> torch.Tensor:
    """Aggregate with one dense, masked matmul per tile: no ``k*k`` copies of the values."""
    B, G, H, W, C = value.shape
    _check_size(H, W, kernel_size)
    kk = kernel_size * kernel_size
    if tile is None:
        tile = default_tile(H, W, kernel_size)
    single, pix, reg, local, owner, region = _tiled_plan(H, W, kernel_size, tile, value.device)
    a = attn.reshape(B, G, H * W, kk)
    v = value.reshape(B, G, H * W, C)
    if H == kernel_size and W == kernel_size:
        # every window is the whole map and window offset ``a`` is pixel ``a``: the weights are already dense
        return torch.matmul(a, v).reshape(B, G, H, W, C)
    if single:
        if not torch.is_grad_enabled() or not (a.requires_grad or v.requires_grad):
            return _single_tile_chunked(a, v, local[0], region).reshape(B, G, H, W, C)
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            dense = a.new_zeros(B, G, H * W, region).scatter_(-1, local[0].expand(B, G, -1, -1), a)
            return torch.matmul(dense, v).reshape(B, G, H, W, C)
        return _SingleTileAV.apply(a, v, local[0], region).reshape(B, G, H, W, C)
    nt, P = pix.shape
    a = a[:, :, pix]  # (B, G, nt, P, kk)
    dense = a.new_zeros(B, G, nt, P, region).scatter_(-1, local.expand(B, G, -1, -1, -1), a)
    out = torch.matmul(dense, v[:, :, reg])  # (B, G, nt, P, C)
    return out.reshape(B, G, nt * P, C)[:, :, owner].reshape(B, G, H, W, C)


def na2d_softmax_av(query: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor, value: torch.Tensor,
                    kernel_size: int) -> torch.Tensor | None:
    """``na2d_av(softmax(query @ keys + bias), value)`` without autograd, one sample at a time.

    ``query`` is ``(B, G, H*W, c)``, ``keys`` ``(B, G, c, k*k)``, ``bias`` ``(G, H*W, k*k)``, ``value``
    ``(B, G, H, W, C)``. Computing a whole batch's logits, then its softmax, then the aggregation streams the
    ``(B, G, H*W, k*k)`` logits through memory three times (17 MB for a 13x13 kernel on a 14x14 map at batch 16);
    per sample, the logits, weights and dense matrix stay in cache. Same operations per sample, same values.
    Only for maps that fit in one tile (``None`` otherwise: use :func:`na2d_av`).
    """
    B, G, H, W, C = value.shape
    k = kernel_size
    _check_size(H, W, k)
    single, _pix, _reg, local, _owner, region = _tiled_plan(H, W, k, default_tile(H, W, k), value.device)
    if not single:
        return None
    v = value.reshape(B, G, H * W, C)
    out = value.new_empty(B, G, H * W, C)
    dense = None if H == k and W == k else value.new_empty(G, H * W, region)
    idx = local[0].expand(G, -1, -1)
    for b in range(B):
        weights = torch.matmul(query[b], keys[b]).add_(bias).softmax(dim=-1)
        if dense is not None:  # scatter each pixel's window weights into its row of the map
            weights = dense.zero_().scatter_(-1, idx, weights)
        torch.matmul(weights, v[b], out=out[b])
    return out.view(B, G, H, W, C)


BACKENDS = {
    "naive": na2d_av_naive,
    "unfold": na2d_av_unfold,
    "tiled": na2d_av_tiled,
}


def na2d_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: int, backend: str = "tiled") -> torch.Tensor:
    """NATTEN-compatible ``na2d_av`` with a selectable backend (see module docstring)."""
    try:
        fn = BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown neighbourhood backend {backend!r}; choose one of {sorted(BACKENDS)}") from None
    if attn.dtype != value.dtype:
        # under autocast the softmax weights come in float32 and the values in the low precision: contract in
        # the autocast dtype, as a matmul under autocast would (explicit ``out=`` buffers are not autocast)
        dtype = value.dtype if torch.is_autocast_enabled(value.device.type) else torch.promote_types(attn.dtype,
                                                                                                    value.dtype)
        attn, value = attn.to(dtype), value.to(dtype)
    return fn(attn, value, kernel_size)
