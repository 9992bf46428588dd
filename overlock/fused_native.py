"""Straight-line native forwards of the fused blocks, for inference on CPU.

At batch 1 a Focus-Net block on a 14x14 map spends ~2.3 ms in its two dozen kernels (GEMMs and the hand-written
ones) and another ~0.3-0.5 ms deciding, per op, whether each fast path applies (grad mode, tracing, layouts,
dtypes), building 4-d views and calling through module and helper layers. Here the whole block runs as one
function on ``(pixels, channels)`` matrices: what can change from call to call (grad mode, tracing, autocast, the
kernels' switch, hooks, the ContMix backend) is asked once per call, what the input's kind fixes (shapes,
strides, dtypes) once per kind, and then the same kernels are called, with the same arguments, as the general
forward's: the very same bits (tests compare the two). Anything else returns ``None`` and the block takes its
general forward. The same steps run as one C call per block where they can (``csrc/blocks_avx2.c``, the 1x1s through
the BLAS routines PyTorch's own products call): in the model the Python between the kernels ran with cold caches,
~0.25 ms a re-parameterized block and ~0.5 ms a Focus-Net block at batch 1; overlock_t's batch-1 forward 71 -> 65 ms
(AVX-512 Xeon).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import contmix
from .fused import GRN_CONV_IN_PLACE_MIN_PIXELS, DepthwiseConv, _hooked, _norm_direct, _tracing
from .layers import LayerNorm2d, PointwiseConv
from .ops import depthwise as depthwise_ops
from .ops import native

__all__ = ["focus_block", "repconv_block"]

_F32 = torch.float32
# Each whole block runs as one native call (csrc/blocks_avx2.c) where it can; False: op by op from Python (the same
# bits: tests compare the two).
WHOLE_BLOCK_CALLS = True


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _calls_allowed() -> bool:
    """What may change between calls (besides hooks): no autograd, no trace or compile, no autocast, kernels on."""
    return (not torch.is_grad_enabled() and native._disabled == 0 and not _tracing()
            and not depthwise_ops._cpu_autocast() and native.used_here())


def _route(block, key, decide) -> Optional[tuple]:
    """The modules whose hooks the straight-line call would skip, if ``decide()`` (run once per ``key``, the kind of
    input) says the call applies, else None; None too while any of them has a hook (their calls must run)."""
    kept = block.__dict__.get("_native_route")
    if kept is None or kept[0] != key:
        kept = (key, decide())
        block.__dict__["_native_route"] = kept
    modules = kept[1]
    return None if modules is None or _hooked(*modules) else modules


def _scaled_addmm_(acc: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor], B: int
                   ) -> None:
    """``acc += (x * scale) @ weight.T`` per sample, ``acc`` ``(B*HW, Cout)``, ``x`` ``(B*HW, Cin)``, ``scale``
    ``(B, Cin)`` or None: the ops of :func:`overlock.fused.pointwise_scaled_add` on a prepared identity."""
    M, C = x.shape
    acc3, xs = acc.view(B, M // B, -1), x.view(B, M // B, C)
    if scale is not None and M // B < weight.shape[0]:  # a small map: scale the map, not the weights
        xs, scale = xs * scale.reshape(B, 1, C), None
    if scale is None:
        acc.addmm_(xs.reshape(M, C), weight.t())
    elif B == 1:
        acc3[0].addmm_(xs[0], (weight * scale.reshape(1, C)).t())
    else:
        acc3.baddbmm_(xs, weight.t().unsqueeze(0) * scale.reshape(B, C, 1))


# The fused blocks' parameters that only GEMMs read (stored transposed: ``fused.gemm_param``); the kernels read every
# other one by address, so those must be contiguous.
_FOCUS_GEMM_WEIGHTS = frozenset(("fusion_weight", "gate_weight", "query_weight", "dyconv_weight", "proj_weight",
                                 "mlp.fc1_weight", "mlp.fc2_weight"))
_REPCONV_GEMM_WEIGHTS = frozenset(("mlp.fc1_weight", "mlp.fc2_weight"))


def _params_ok(block: nn.Module, gemm_weights: frozenset) -> bool:
    """Float32 CPU parameters, contiguous, or for those in ``gemm_weights`` the transpose of a contiguous matrix."""
    for name, p in block.named_parameters():
        if p.dtype != _F32 or p.device.type != "cpu":
            return False
        if not (p.is_contiguous() or (name in gemm_weights and p.dim() == 2 and p.t().is_contiguous())):
            return False
    return True


def _map_ok(t: torch.Tensor, B: int, H: int, W: int) -> bool:
    """A float32 CPU ``(B, C, H, W)`` map whose pixels are rows of its channels (any pixel stride: a channel slice
    of a channels_last map), ``C`` a multiple of 8."""
    return (type(t) is torch.Tensor and t.dim() == 4 and t.dtype == _F32 and t.device.type == "cpu"
            and tuple(t.shape[::2]) == (B, H) and t.shape[3] == W and t.shape[1] % 8 == 0 and t.stride(1) == 1
            and t.stride(2) == W * t.stride(3) and t.stride(0) == H * W * t.stride(3))


def _focus_route(block, x: torch.Tensor, ctx: torch.Tensor, prior: Optional[torch.Tensor]) -> Optional[tuple]:
    """Whether :func:`focus_block` runs ``block`` on inputs of this kind (checked once per kind): the modules whose
    calls it replaces, or None."""
    B, Cx, H, W = x.shape
    if not (_map_ok(x, B, H, W) and _map_ok(ctx, B, H, W) and (prior is None or _map_ok(prior, B, H, W))):
        return None
    if prior is not None and prior.shape != ctx.shape:
        return None
    if block.is_first and not (x.is_contiguous(memory_format=torch.channels_last)
                               and ctx.is_contiguous(memory_format=torch.channels_last)):
        return None  # torch.cat must give a channels_last map, as the general forward's
    C, D = Cx + ctx.shape[1], block.fusion_weight.shape[0]
    E, k, G = block.mlp.fc1_weight.shape[0], block.kernel_size, block.num_heads
    if not _params_ok(block, _FOCUS_GEMM_WEIGHTS):
        return None
    s = block.smk_size
    if (block.approximate != "none" or block.mlp.approximate != "none" or block.se.approximate != "none"
            or block.mlp.fc1_bias is None or block.proj_bias is None or block.mlp.fc2_bias is None
            or block.lepe.bias is None or D % (2 * G) or (D // (2 * G)) % 8 or H < k or W < k or k * k > 1024
            or block.query_weight.shape[0] % G or block.se.fc1_weight.shape[0] > 4096 or D > 4096
            or E % 8 or D % 8 or block.rpb1.shape != (G, 2 * s - 1, 2 * s - 1)
            or block.rpb2.shape != (G, 2 * k - 1, 2 * k - 1) or block.weight_proj.weight.shape[0] != k * k + s * s):
        return None
    cl = torch.channels_last
    convs = ((block.dwconv1, C), (block.fusion_dw, C), (block.lepe, D), (block.dwconv2, C), (block.mlp.dwconv, E))
    for conv, channels in convs:
        probe = torch.empty(B, channels, H, W, memory_format=cl)
        if type(conv) is not DepthwiseConv or conv.bias is None or not conv._direct(probe):
            return None
        if conv is not block.lepe and conv.kernel_size[0] * conv.kernel_size[1] > 9:
            return None
    probe = torch.empty(B, C, H, W, memory_format=cl)
    if not all(type(n) is LayerNorm2d and _norm_direct(n, probe) for n in (block.norm1, block.norm2)):
        return None
    wk = block.weight_key
    if not (len(wk) == 2 and type(wk[0]) is nn.AdaptiveAvgPool2d and type(wk[1]) is PointwiseConv):
        return None
    return (block.dwconv1, block.norm1, block.fusion_dw, block.lepe, wk, *wk, block.dwconv2, block.norm2,
            block.mlp.dwconv)


def focus_block(block, x: torch.Tensor, ctx: torch.Tensor, prior: Optional[torch.Tensor]
                ) -> Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """:class:`~overlock.fused_focus.FusedDynamicConvBlock`'s forward, or ``None`` where it does not apply."""
    if not _calls_allowed() or contmix.get_backend() != "tiled":
        return None
    prior = None if block.is_first else prior
    if type(x) is not torch.Tensor or type(ctx) is not torch.Tensor:
        return None
    key = (x.shape, x.stride(), ctx.shape, ctx.stride(), None if prior is None else (prior.shape, prior.stride()),
           x.device, x.dtype, ctx.dtype, None if prior is None else prior.dtype, block.proj_weight.dtype,
           depthwise_ops.NATIVE_SMALL_KERNEL_PIXELS, depthwise_ops.NATIVE_SMALL_KERNEL_VALUES)
    if _route(block, key, lambda: _focus_route(block, x, ctx, prior)) is None:
        return None
    lib = native._library()
    B, Cx, H, W = x.shape
    Cc = ctx.shape[1]
    C, M, HW = Cx + Cc, B * H * W, H * W
    empty = torch.empty
    whole = native.whole_blocks() if WHOLE_BLOCK_CALLS else None
    if whole is not None:
        out = empty(M, C)
        if _focus_call(whole, block, x, ctx, prior, out, B, H, W) == 0:
            return _focus_output(block, out, B, H, W, C)
    # [x, ctx] (the context first updated, except in the first block)
    if prior is None:
        z = torch.cat([x, ctx], dim=1)
        if not z.is_contiguous(memory_format=torch.channels_last):
            return None
        z = z.permute(0, 2, 3, 1).reshape(M, C)
    else:
        z = empty(M, C)
        lib.overlock_context_concat_avx2(x.data_ptr(), x.stride(3), Cx, ctx.data_ptr(), ctx.stride(3),
                                         prior.data_ptr(), prior.stride(3), Cc, block.ctx_weight.data_ptr(),
                                         block.prior_weight.data_ptr(), block.ctx_bias.data_ptr(), z.data_ptr(), M)
    # identity * ls1 + proj's bias, and y = norm1(dwconv1(z)): one call
    identity, y = empty(M, C), empty(M, C)
    _conv_norm(lib, block.dwconv1, block.norm1, z, identity, y, block.ls1_weight, block.proj_bias, B, H, W)
    # h = GRN(fusion 1x1(GELU(fusion dw(y))) + its bias)
    conv = block.fusion_dw
    hidden = empty(M, C)
    lib.overlock_depthwise_gelu_avx2(y.data_ptr(), conv._taps().data_ptr(), conv.bias.data_ptr(), hidden.data_ptr(),
                                     B, H, W, C, *conv.kernel_size)
    h = F.linear(hidden, block.fusion_weight)
    D = h.shape[1]
    scale = empty(B, D)
    lib.overlock_grn_scale_bias_avx2(h.data_ptr(), _ptr(block.fusion_bias), block.grn_gamma.data_ptr(),
                                     scale.data_ptr(), B, HW, D)
    h4 = h.view(B, H, W, D).permute(0, 3, 1, 2)
    torch.addcmul(block.grn_beta, h4, scale.view(B, D, 1, 1), out=h4)
    gate = F.linear(h, block.gate_weight)
    # mixed = dyconv_proj(ContMix(h)) + LePE(h): the GEMM accumulates into LePE's output
    conv = block.lepe
    mixed = empty(M, D)
    lib.overlock_depthwise_avx2(h.data_ptr(), conv._taps().data_ptr(), conv.bias.data_ptr(), mixed.data_ptr(), B, H,
                                W, D, *conv.kernel_size, 1)
    aggregated = _context_mix(block, y, h, B, H, W, Cx)
    if aggregated is None:
        return None
    mixed.addmm_(aggregated, block.dyconv_weight.t())
    # identity += proj(SiLU(gate + bias) * mixed * SE(mixed))
    se = block.se
    se_scale = empty(B, D)
    lib.overlock_se_gate_avx2(mixed.data_ptr(), B, HW, D, se.fc1_weight.data_ptr(), se.fc1_bias.data_ptr(),
                              se.fc1_weight.shape[0], se.fc2_weight.data_ptr(), se.fc2_bias.data_ptr(),
                              se_scale.data_ptr())
    if block.gate_bias is None:
        lib.overlock_silu_mul_avx2(gate.data_ptr(), mixed.data_ptr(), M * D)
    else:
        lib.overlock_bias_silu_mul_avx2(gate.data_ptr(), block.gate_bias.data_ptr(), mixed.data_ptr(), M, D)
    _scaled_addmm_(identity, gate, block.proj_weight, se_scale, B)
    # the MLP half: identity * ls2 + fc2's bias, and norm2(dwconv2(.)), then the GRN-MLP added in
    mlp = block.mlp
    out, y = empty(M, C), empty(M, C)
    _conv_norm(lib, block.dwconv2, block.norm2, identity, out, y, block.ls2_weight, mlp.fc2_bias, B, H, W)
    if not _grn_mlp_add(lib, mlp, y, out, None, B, H, W):
        return None
    return _focus_output(block, out, B, H, W, C)


def _focus_output(block, out: torch.Tensor, B: int, H: int, W: int, C: int):
    out = out.view(B, H, W, C).permute(0, 3, 1, 2)
    if block.is_last:
        return out, None
    return tuple(out.split([block.dim, block.ctx_dim], dim=1))


def _t(w: torch.Tensor) -> int:
    """1 for a 1x1 weight stored as the transpose of a contiguous matrix (``fused.gemm_param``), else 0."""
    return 0 if w.is_contiguous() else 1


def _in_place(conv, H: int, W: int) -> int:
    """Whether the GRN MLP's conv writes over its input (as :func:`_grn_mlp_add` decides)."""
    return int(H * W >= GRN_CONV_IN_PLACE_MIN_PIXELS and conv.kernel_size[0] <= 3 and conv.kernel_size[1] <= 3)


def _pool_size(pool: nn.AdaptiveAvgPool2d, H: int, W: int) -> Tuple[int, int]:
    size = pool.output_size
    oh, ow = (size, size) if isinstance(size, int) else size
    return (H if oh is None else oh), (W if ow is None else ow)


def _focus_call(lib, block, x: torch.Tensor, ctx: torch.Tensor, prior: Optional[torch.Tensor], out: torch.Tensor,
                B: int, H: int, W: int) -> int:
    """:func:`focus_block` as one call (csrc/blocks_avx2.c) into ``out`` ``(B*H*W, C)``: 0, or the C code's refusal
    (then nothing but scratch was written)."""
    mlp, se, proj, n1, n2 = block.mlp, block.se, block.weight_proj, block.norm1, block.norm2
    pool, key = block.weight_key
    d1, fdw, lepe, d2, mdw = block.dwconv1, block.fusion_dw, block.lepe, block.dwconv2, mlp.dwconv
    first = prior is None
    context = (None, 0, None, None, None) if first else (
        prior.data_ptr(), prior.stride(3), block.ctx_weight.data_ptr(), block.prior_weight.data_ptr(),
        block.ctx_bias.data_ptr())
    fusion, gate, query, dyconv, proj_w = (block.fusion_weight, block.gate_weight, block.query_weight,
                                           block.dyconv_weight, block.proj_weight)
    return lib.overlock_focus_block_avx2(
        x.data_ptr(), x.stride(3), x.shape[1], ctx.data_ptr(), ctx.stride(3), ctx.shape[1], *context,
        out.data_ptr(), B, H, W,
        d1._taps().data_ptr(), d1.bias.data_ptr(), *d1.kernel_size, n1.weight.data_ptr(), n1.bias.data_ptr(), n1.eps,
        _ptr(block.ls1_weight), _ptr(block.proj_bias),
        fdw._taps().data_ptr(), fdw.bias.data_ptr(), *fdw.kernel_size,
        fusion.data_ptr(), _t(fusion), _ptr(block.fusion_bias), fusion.shape[0], block.grn_gamma.data_ptr(),
        block.grn_beta.data_ptr(), gate.data_ptr(), _t(gate), _ptr(block.gate_bias),
        lepe._taps().data_ptr(), lepe.bias.data_ptr(), *lepe.kernel_size,
        query.data_ptr(), _t(query), _ptr(block.query_bias), query.shape[0], *_pool_size(pool, H, W),
        key.weight.data_ptr(), _ptr(key.bias), key.weight.shape[0], proj.weight.data_ptr(), _ptr(proj.bias),
        block.num_heads, block.kernel_size, block.smk_size, block.rpb1.data_ptr(), block.rpb2.data_ptr(),
        dyconv.data_ptr(), _t(dyconv),
        se.fc1_weight.data_ptr(), se.fc1_bias.data_ptr(), se.fc1_weight.shape[0], se.fc2_weight.data_ptr(),
        se.fc2_bias.data_ptr(), proj_w.data_ptr(), _t(proj_w),
        d2._taps().data_ptr(), d2.bias.data_ptr(), *d2.kernel_size, n2.weight.data_ptr(), n2.bias.data_ptr(), n2.eps,
        _ptr(block.ls2_weight),
        mlp.fc1_weight.data_ptr(), _t(mlp.fc1_weight), mlp.fc1_bias.data_ptr(), mlp.fc1_weight.shape[0],
        mdw._taps().data_ptr(), mdw.bias.data_ptr(), *mdw.kernel_size, mlp.grn_gamma.data_ptr(), _in_place(mdw, H, W),
        mlp.fc2_weight.data_ptr(), _t(mlp.fc2_weight), mlp.fc2_bias.data_ptr())


def _conv_norm(lib, conv, norm, x, identity, y, scale, shift, B, H, W) -> None:
    """``identity = conv(x) * scale + shift``, ``y = norm(conv(x))`` (``native.depthwise_conv2d_taps_norm``)."""
    C = x.shape[1]
    lib.overlock_depthwise_ln_avx2(x.data_ptr(), conv._taps().data_ptr(), conv.bias.data_ptr(), identity.data_ptr(),
                                   y.data_ptr(), norm.weight.data_ptr(), norm.bias.data_ptr(), norm.eps, _ptr(scale),
                                   _ptr(shift), B, H, W, C, *conv.kernel_size)


def _context_mix(block, y: torch.Tensor, h: torch.Tensor, B: int, H: int, W: int, Cx: int
                 ) -> Optional[torch.Tensor]:
    """ContMix of the block's query half of ``y``, its key half and the values ``h``, as ``(B*H*W, C)``: the ops of
    :meth:`~overlock.contmix.ContMixCore.context_mix` down to its native aggregation."""
    M, C = y.shape
    query = F.linear(y[:, :Cx], block.query_weight, block.query_bias)
    pool, conv = block.weight_key  # the route checked: AdaptiveAvgPool2d, PointwiseConv (its forward here)
    key = F.adaptive_avg_pool2d(y.view(B, H, W, C).permute(0, 3, 1, 2)[:, Cx:], pool.output_size)
    if key.stride(1) == 1:
        key = F.linear(key.permute(0, 2, 3, 1), conv.weight.flatten(1), conv.bias).permute(0, 3, 1, 2)
    else:
        key = conv(key)
    G, k, s = block.num_heads, block.kernel_size, block.smk_size
    c, ss, kk = query.shape[1] // G, s * s, k * k
    proj = block.weight_proj
    n_ctx = key.shape[-2] * key.shape[-1]
    keys = torch.matmul(key.reshape(B, G, c, n_ctx), proj.weight.reshape(ss + kk, n_ctx).t())
    D = h.shape[1]
    cv = D // (2 * G)
    values = h.view(B, H, W, 2, G, cv).permute(3, 0, 4, 1, 2, 5).contiguous()  # (2, B, G, H, W, cv)
    out = torch.empty(B, H, W, 2, G, cv)
    proj_bias = proj.bias if proj.bias is not None else keys.new_zeros(ss + kk)
    # native.na2d_softmax_av_pair's call, its checks made by the route: queries (B, G, HW, c) through their
    # strides, the two halves of keys, the position tables, the output's halves (2, B, G, H, W, cv)
    Cq, HW = query.shape[1], H * W
    rc = native._library().overlock_na2d_softmax_av_avx2(
        query.data_ptr(), HW * Cq, c, Cq, keys.data_ptr(), keys.data_ptr() + 4 * ss, *keys.stride()[:3],
        block.rpb1.data_ptr(), block.rpb2.data_ptr(), proj_bias.data_ptr(), proj_bias.data_ptr() + 4 * ss,
        values.data_ptr(), B * G * HW * cv, G * HW * cv, HW * cv, cv, out.data_ptr(), G * cv, HW * 2 * G * cv,
        cv, 2 * G * cv, B, G, H, W, c, cv, s, k)
    return out.view(M, D) if rc == 0 else None


def _grn_mlp_add(lib, mlp, y: torch.Tensor, out: torch.Tensor, gate: Optional[torch.Tensor], B: int, H: int, W: int
                 ) -> bool:
    """``out += mlp(y * gate)`` (:meth:`~overlock.fused.FusedGrnMlp.forward_add` on a prepared identity), ``y`` and
    ``out`` ``(B*H*W, C)``, ``gate`` ``(B, C)`` or None; ``False`` if a kernel refused (nothing added then)."""
    M, C = y.shape
    HW, weight = H * W, mlp.fc1_weight
    xs = y.view(B, HW, C)
    if gate is not None and HW < weight.shape[0]:  # as pointwise_scaled: the small map scaled, not the weights
        xs, gate = xs * gate.reshape(B, 1, C), None
    if gate is None:
        hidden = F.linear(xs.view(M, C), weight)
    elif B == 1:
        hidden = F.linear(xs[0], weight * gate.reshape(1, C))
    else:
        hidden = torch.bmm(xs, weight.t().unsqueeze(0) * gate.reshape(B, C, 1)).view(M, -1)
    E = hidden.shape[1]
    lib.overlock_bias_gelu_avx2(hidden.data_ptr(), mlp.fc1_bias.data_ptr(), M, E, E)
    conv = mlp.dwconv
    apply = HW < mlp.fc2_weight.shape[0]  # as FusedGrnMlp.hidden
    inplace = HW >= GRN_CONV_IN_PLACE_MIN_PIXELS and conv.kernel_size[0] <= 3 and conv.kernel_size[1] <= 3
    scale, rows = torch.empty(B, E), torch.empty(M // W * E)
    if inplace:
        rc = lib.overlock_depthwise_grn_inplace_avx2(hidden.data_ptr(), conv._taps().data_ptr(), conv.bias.data_ptr(),
                                                     mlp.grn_gamma.data_ptr(), scale.data_ptr(), rows.data_ptr(),
                                                     int(apply), B, H, W, E, *conv.kernel_size)
        grn = hidden
    else:
        grn = torch.empty(M, E)
        rc = lib.overlock_depthwise_grn_avx2(hidden.data_ptr(), conv._taps().data_ptr(), conv.bias.data_ptr(),
                                             grn.data_ptr(), mlp.grn_gamma.data_ptr(), scale.data_ptr(),
                                             rows.data_ptr(), int(apply), B, H, W, E, *conv.kernel_size)
    if rc != 0:
        return False
    _scaled_addmm_(out, grn, mlp.fc2_weight, None if apply else scale, B)
    return True


def _repconv_route(block, x: torch.Tensor, out: Optional[torch.Tensor]) -> Optional[tuple]:
    """Whether :func:`repconv_block` runs ``block`` on inputs of this kind (checked once per kind): the modules whose
    calls it replaces, or None."""
    B, C, H, W = x.shape
    cl = torch.channels_last
    if not (type(x) is torch.Tensor and x.dtype == _F32 and x.device.type == "cpu" and C % 8 == 0
            and x.is_contiguous(memory_format=cl)):
        return None
    if out is not None and not (type(out) is torch.Tensor and out.shape == x.shape and out.dtype == _F32
                                and out.is_contiguous(memory_format=cl)):
        return None
    mlp, se = block.mlp, block.se
    if not _params_ok(block, _REPCONV_GEMM_WEIGHTS):
        return None
    if (mlp.approximate != "none" or se.approximate != "none" or mlp.fc1_bias is None or mlp.fc2_bias is None
            or C > 4096 or se.fc1_weight.shape[0] > 4096 or mlp.fc1_weight.shape[0] % 8):
        return None
    for conv, channels in ((block.dwconv, C), (block.large_kernel, C), (mlp.dwconv, mlp.fc1_weight.shape[0])):
        probe = torch.empty(B, channels, H, W, memory_format=cl)
        if type(conv) is not DepthwiseConv or conv.bias is None or not conv._direct(probe):
            return None
        if conv is not block.large_kernel and conv.kernel_size[0] * conv.kernel_size[1] > 9:
            return None
    if not (type(block.norm) is LayerNorm2d and _norm_direct(block.norm, torch.empty(B, C, H, W, memory_format=cl))):
        return None
    return block.dwconv, block.norm, block.large_kernel, mlp.dwconv


def repconv_block(block, x: torch.Tensor, out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """:meth:`~overlock.fused.FusedRepConvBlock._forward` (the residual identity written into ``out`` if given), or
    ``None`` where it does not apply."""
    if not _calls_allowed():
        return None
    mlp = block.mlp
    key = (x.shape, x.stride(), x.device, x.dtype, type(x),
           None if out is None else (out.shape, out.stride(), out.dtype),
           mlp.fc2_weight.dtype, depthwise_ops.NATIVE_SMALL_KERNEL_PIXELS, depthwise_ops.NATIVE_SMALL_KERNEL_VALUES)
    if _route(block, key, lambda: _repconv_route(block, x, out)) is None:
        return None
    lib = native._library()
    B, C, H, W = x.shape
    M = B * H * W
    result = (torch.empty_like(x) if out is None else out)
    whole = native.whole_blocks() if WHOLE_BLOCK_CALLS else None
    if whole is not None and _repconv_call(whole, block, x, result, B, H, W) == 0:
        return result
    identity, y = result.permute(0, 2, 3, 1).view(M, C), torch.empty(M, C)
    _conv_norm(lib, block.dwconv, block.norm, x.permute(0, 2, 3, 1).view(M, C), identity, y, block.ls_weight,
               mlp.fc2_bias, B, H, W)
    conv = block.large_kernel
    large = torch.empty(M, C)
    lib.overlock_depthwise_avx2(y.data_ptr(), conv._taps().data_ptr(), conv.bias.data_ptr(), large.data_ptr(), B, H,
                                W, C, *conv.kernel_size, 1)
    se, gate = block.se, torch.empty(B, C)
    lib.overlock_se_gate_avx2(large.data_ptr(), B, H * W, C, se.fc1_weight.data_ptr(), se.fc1_bias.data_ptr(),
                              se.fc1_weight.shape[0], se.fc2_weight.data_ptr(), se.fc2_bias.data_ptr(),
                              gate.data_ptr())
    if not _grn_mlp_add(lib, mlp, large, identity, gate, B, H, W):
        return None
    return result


def _repconv_call(lib, block, x: torch.Tensor, result: torch.Tensor, B: int, H: int, W: int) -> int:
    """:func:`repconv_block` as one call (csrc/blocks_avx2.c): 0, or the C code's refusal."""
    mlp, se, norm = block.mlp, block.se, block.norm
    dw, lk, mdw = block.dwconv, block.large_kernel, mlp.dwconv
    return lib.overlock_repconv_block_avx2(
        x.data_ptr(), result.data_ptr(), B, H, W, x.shape[1],
        dw._taps().data_ptr(), dw.bias.data_ptr(), *dw.kernel_size, norm.weight.data_ptr(), norm.bias.data_ptr(),
        norm.eps, _ptr(block.ls_weight),
        lk._taps().data_ptr(), lk.bias.data_ptr(), *lk.kernel_size,
        se.fc1_weight.data_ptr(), se.fc1_bias.data_ptr(), se.fc1_weight.shape[0], se.fc2_weight.data_ptr(),
        se.fc2_bias.data_ptr(),
        mlp.fc1_weight.data_ptr(), _t(mlp.fc1_weight), mlp.fc1_bias.data_ptr(), mlp.fc1_weight.shape[0],
        mdw._taps().data_ptr(), mdw.bias.data_ptr(), *mdw.kernel_size, mlp.grn_gamma.data_ptr(), _in_place(mdw, H, W),
        mlp.fc2_weight.data_ptr(), _t(mlp.fc2_weight), mlp.fc2_bias.data_ptr())
