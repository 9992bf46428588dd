"""ContMix: context-mixing dynamic convolution, and the official plug-and-play ``ContMixBlock``.

Per pixel, affinities between its query and the keys of the 7x7 pooled context regions (49 per head) are
mapped by a learned linear layer (``weight_proj``, a 1x1 conv over the 49 affinities) to the logits of two
dynamic kernels, a small ``smk_size^2`` one and a large ``kernel_size^2`` one. A relative position bias is
added, a softmax taken, and the kernels aggregate the values over each pixel's NATTEN-style neighbourhood,
the first half of the channels with the small kernel, the second half with the large one.

``weight_proj`` is linear, so it is applied to the keys rather than to the affinities
(``P (q . k) == q . (P k)``): one small matmul per pixel instead of two, same parameters and gradients.
The backend (``set_backend``) selects only the neighbourhood-aggregation kernel; on the CPUs with the hand-written
kernels the ``tiled`` backend runs the softmax and aggregation fused, at inference and in training
(:mod:`overlock.ops.softmax_av`).

``ContMixCore`` holds the dynamic-convolution layer shared by ``ContMixBlock`` and the Focus-Net's
``DynamicConvBlock`` (``models/blocks.py``): the ContMix mixer with its gate, large-kernel positional branch
(LePE) and SE, and the block's residual rule.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import (ConvNorm, DilatedReparamBlock, GrnMlp, LayerNorm2d, LayerScale, PointwiseConv, ResDWConv,
                     SEModule, conv_bn, tensor_key)
from .ops import softmax_av
from .ops.neighborhood import BACKENDS, na2d_av, na2d_softmax_av, rpb_index

__all__ = ["context_mix", "context_mix_reference", "window_biases", "ContMixCore", "ContMixBlock", "set_backend",
           "get_backend", "use_backend", "BACKEND_NAMES"]

BACKEND_NAMES = ("tiled", "unfold", "naive")
_backend = os.environ.get("OVERLOCK_CONTMIX_BACKEND", "tiled")


def set_backend(name: str) -> None:
    """Select the ContMix aggregation backend for all models: ``tiled`` (fast), ``unfold`` (official), ``naive``."""
    global _backend
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown ContMix backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    """Temporarily select a ContMix backend (``with overlock.use_backend("unfold"): ...``)."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


if _backend not in BACKEND_NAMES:
    raise ValueError(f"OVERLOCK_CONTMIX_BACKEND={_backend!r} is not one of {', '.join(BACKEND_NAMES)}")
assert set(BACKEND_NAMES) == set(BACKENDS)


def context_mix(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, weight_proj: nn.Conv2d,
                rpb_small: torch.Tensor, rpb_large: torch.Tensor, smk_size: int, kernel_size: int,
                num_heads: int, backend: str | None = None, biases=None) -> torch.Tensor:
    """Dynamic-kernel aggregation of ContMix.

    Args:
        query: ``(B, C/2, H, W)``, already scaled by ``head_dim ** -0.5``.
        key: ``(B, C/2, 7, 7)`` keys of the pooled context regions.
        value: ``(B, C, H, W)``; first half aggregated with the small kernel, second half with the large one.
        weight_proj: the 1x1 conv mapping 49 affinities to ``smk^2 + k^2`` kernel logits.
        rpb_small, rpb_large: ``(G, 2s-1, 2s-1)`` and ``(G, 2k-1, 2k-1)`` relative position biases.
        backend: aggregation kernel (default: the one chosen by ``set_backend``).
        biases: ``window_biases(...)`` of these parameters and map size if already computed, or a function
            giving them or ``None`` (called only where they are needed: the CPU kernels sum them from the tables).
    Returns:
        ``(B, C, H, W)`` laid out as ``value``'s NHWC view (channels_last when the input is).
    """
    B, Cq, H, W = query.shape
    G = num_heads
    c = Cq // G
    n_ctx = key.shape[-2] * key.shape[-1]
    ss, kk = smk_size * smk_size, kernel_size * kernel_size
    q = query.permute(0, 2, 3, 1).reshape(B, H * W, G, c).transpose(1, 2)  # (B, G, HW, c)
    keys = torch.matmul(key.reshape(B, G, c, n_ctx), weight_proj.weight.reshape(ss + kk, n_ctx).t())
    backend = backend or _backend
    cv = value.shape[1] // (2 * G)
    v = value.permute(0, 2, 3, 1).reshape(B, H, W, 2, G, cv).permute(3, 0, 4, 1, 2, 5)  # (2, B, G, H, W, cv)
    per_sample = backend == "tiled" and _per_sample_ok(q, keys, v)
    if per_sample:
        out = _native_context_mix(q, keys, (rpb_small, rpb_large, weight_proj.bias), v, smk_size, kernel_size)
        if out is not None:
            return out.reshape(B, H, W, 2 * G * cv).permute(0, 3, 1, 2)
    biases = biases() if callable(biases) else biases
    if biases is None:
        biases = window_biases(rpb_small, rpb_large, weight_proj.bias, H, W, smk_size, kernel_size)
    if per_sample:
        # a map that is one tile for the small kernel is one for the large kernel too (default_tile)
        x1 = na2d_softmax_av(q, keys[..., :ss], biases[0], v[0], smk_size)
        x2 = None if x1 is None else na2d_softmax_av(q, keys[..., ss:], biases[1], v[1], kernel_size)
        if x2 is not None:
            out = torch.cat([x1.permute(0, 2, 3, 1, 4), x2.permute(0, 2, 3, 1, 4)], dim=3)
            return out.reshape(B, H, W, 2 * G * cv).permute(0, 3, 1, 2)
    if backend == "tiled" and softmax_av.applies(q, keys, value, smk_size, kernel_size, G):  # CPU training
        return softmax_av.softmax_av(q, keys[..., :ss], keys[..., ss:], biases[0], biases[1], value, smk_size,
                                     kernel_size, G).permute(0, 3, 1, 2)
    # the biases are added in place: a matmul keeps no output for its backward
    a1 = torch.matmul(q, keys[..., :ss]).add_(biases[0])
    a2 = torch.matmul(q, keys[..., ss:]).add_(biases[1])
    a1 = a1.softmax(dim=-1).reshape(B, G, H, W, ss)
    a2 = a2.softmax(dim=-1).reshape(B, G, H, W, kk)
    x1 = na2d_av(a1, v[0], smk_size, backend)
    x2 = na2d_av(a2, v[1], kernel_size, backend)
    out = torch.cat([x1.permute(0, 2, 3, 1, 4), x2.permute(0, 2, 3, 1, 4)], dim=3)  # (B, H, W, 2G, cv)
    return out.reshape(B, H, W, 2 * G * cv).permute(0, 3, 1, 2)


def _native_context_mix(q, keys, tables, v, smk_size: int, kernel_size: int):
    """Both aggregations by the fused hand-written kernel (ops/native.py, one call) into one ``(B, H, W, 2, G, cv)``
    buffer, on the CPUs where the hand-written kernels are used; ``None`` where it does not apply. ``tables``:
    the two position-bias tables and the projection's bias, from which the kernel sums each pixel's biases."""
    from .ops import native
    if v.device.type != "cpu" or not native.used_here():
        return None
    _, B, G, H, W, cv = v.shape
    ss = smk_size * smk_size
    rpb_small, rpb_large, proj_bias = tables
    if proj_bias is None:
        proj_bias = keys.new_zeros(keys.shape[-1])
    out = v.new_empty(B, H, W, 2, G, cv)
    halves = out.permute(3, 0, 4, 1, 2, 5)  # (2, B, G, H, W, cv) like v
    # Each head's values as a compact (H, W, cv) block: in the NHWC map one pixel's head lies 2*G*cv floats past
    # the previous one (1 KB in overlock_t's Focus-Net), so a 13x13 window's rows fell into a few L1 cache sets;
    # one copy of the map makes the kernel 1.3-1.4x faster there (same bits).
    v = v.contiguous()
    # q and keys as they are: the kernel takes their strides (a copy of each cost more than its reads)
    if not native.na2d_softmax_av_pair(q, keys[..., :ss], keys[..., ss:], rpb_small, rpb_large, v, smk_size,
                                       kernel_size, halves, proj_bias=(proj_bias[:ss], proj_bias[ss:])):
        return None
    return out


def _per_sample_ok(*tensors: torch.Tensor) -> bool:
    """The per-sample inference path (:func:`na2d_softmax_av`): CPU (a cache trick; a GPU wants the whole batch
    per launch), no autograd, one dtype, not traced or compiled."""
    if tensors[0].device.type != "cpu":
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return len({t.dtype for t in tensors}) == 1 and not torch.is_autocast_enabled(tensors[0].device.type)


def context_mix_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, weight_proj: nn.Conv2d,
                          rpb_small: torch.Tensor, rpb_large: torch.Tensor, smk_size: int, kernel_size: int,
                          num_heads: int, backend: str = "naive", biases=None) -> torch.Tensor:
    """:func:`context_mix` in the official order of operations (affinities ``q . k``, then ``weight_proj``).

    The yardstick for tests, and what ``overlock info`` counts (the paper's FLOPs are those of this order).
    ``biases`` is accepted for a drop-in signature and not used (the biases are added as the official code does).
    """
    B, Cq, H, W = query.shape
    G, c = num_heads, Cq // num_heads
    ss = smk_size * smk_size
    q = query.permute(0, 2, 3, 1).reshape(B, H * W, G, c).transpose(1, 2)
    affinity = torch.matmul(q, key.reshape(B, G, c, -1))  # (B, G, HW, 49)
    logits = torch.matmul(affinity, weight_proj.weight.flatten(1).t()) + weight_proj.bias
    a1 = (logits[..., :ss] + _gather_rpb(rpb_small, H, W, smk_size)).softmax(-1).reshape(B, G, H, W, -1)
    a2 = (logits[..., ss:] + _gather_rpb(rpb_large, H, W, kernel_size)).softmax(-1).reshape(B, G, H, W, -1)
    cv = value.shape[1] // (2 * G)
    v = value.permute(0, 2, 3, 1).reshape(B, H, W, 2, G, cv).permute(3, 0, 4, 1, 2, 5)
    x1, x2 = na2d_av(a1, v[0], smk_size, backend), na2d_av(a2, v[1], kernel_size, backend)
    return torch.cat([x1, x2], dim=1).permute(0, 1, 4, 2, 3).reshape(B, 2 * G * cv, H, W)


def window_biases(rpb_small: torch.Tensor, rpb_large: torch.Tensor, proj_bias: torch.Tensor, height: int,
                  width: int, smk_size: int, kernel_size: int):
    """Per-pixel additive logit biases of both kernels: relative position bias of each window offset plus
    ``weight_proj``'s bias, shapes ``(G, H*W, smk^2)`` and ``(G, H*W, k^2)``."""
    bias_s, bias_l = proj_bias.split([smk_size * smk_size, kernel_size * kernel_size])
    return (_gather_rpb(rpb_small, height, width, smk_size) + bias_s,
            _gather_rpb(rpb_large, height, width, kernel_size) + bias_l)


def _gather_rpb(table: torch.Tensor, height: int, width: int, kernel_size: int) -> torch.Tensor:
    """``(G, H*W, k*k)`` relative position biases of every pixel's window (``index_select``: one flat gather)."""
    idx = rpb_index(height, width, kernel_size, table.device)
    return table.flatten(1).index_select(1, idx.flatten()).view(table.shape[0], *idx.shape)


def upsampled_size(height: int, width: int, kernel_size: int):
    """The official resize target for maps smaller than the kernel (short side up to ``kernel_size``)."""
    if height < width:
        return kernel_size, int(kernel_size / height * width)
    return int(kernel_size / width * height), kernel_size


def make_rpb(num_heads: int, kernel_size: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))


class ContMixCore(nn.Module):
    """The dynamic-convolution layer shared by ``ContMixBlock`` and ``DynamicConvBlock``.

    Subclasses call :meth:`_init_core` (parameters keep the official names) and build their forward from
    :meth:`dynamic_conv` and :meth:`residual`.
    """

    def _init_core(self, dim: int, key_dim: int, out_dim: int, kernel_size: int, smk_size: int, num_heads: int,
                   res_scale: bool, drop_path: float, deploy: bool) -> None:
        self.kernel_size = kernel_size
        self.smk_size = smk_size
        self.num_heads = num_heads * 2  # the official blocks double the given head count
        self.scale = (dim // self.num_heads) ** -0.5
        self.res_scale = res_scale
        self.rpb1 = make_rpb(self.num_heads, smk_size)
        self.rpb2 = make_rpb(self.num_heads, kernel_size)
        self.weight_query = conv_bn(dim, dim // 2)
        self.weight_key = ConvNorm(nn.AdaptiveAvgPool2d(7), *conv_bn(key_dim, dim // 2))
        self.weight_proj = PointwiseConv(49, kernel_size ** 2 + smk_size ** 2)
        self.lepe = ConvNorm(DilatedReparamBlock(dim, kernel_size, deploy=deploy), nn.BatchNorm2d(dim))
        self.se_layer = SEModule(dim)
        self.gate = conv_bn(dim, dim, nn.SiLU())
        self.proj = ConvNorm(nn.BatchNorm2d(dim), PointwiseConv(dim, out_dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def context_mix(self, query_src: torch.Tensor, key_src: torch.Tensor, value: torch.Tensor,
                    value_proj: nn.Module | None = None) -> torch.Tensor:
        """ContMix: queries from ``query_src``, keys from the 7x7 regions of ``key_src``, aggregating ``value``.

        A map smaller than the large kernel is resized up (bilinear; short side to the kernel size) before
        the projections and the result pooled back, as in the official code.
        """
        H, W = value.shape[-2:]
        small = min(H, W) < self.kernel_size
        if small:
            size = upsampled_size(H, W, self.kernel_size)
            resized = {}  # ContMixBlock passes one map for all three: resize it once
            for t in (query_src, key_src, value):
                if id(t) not in resized:
                    resized[id(t)] = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
            query_src, key_src, value = resized[id(query_src)], resized[id(key_src)], resized[id(value)]
        if value_proj is not None:
            value = value_proj(value)
        out = context_mix(self.query(query_src), self.weight_key(key_src), value,
                          self.weight_proj, self.rpb1, self.rpb2, self.smk_size, self.kernel_size, self.num_heads,
                          biases=functools.partial(self._cached_biases, *value.shape[-2:]))
        return F.adaptive_avg_pool2d(out, (H, W)) if small else out

    def query(self, query_src: torch.Tensor) -> torch.Tensor:
        """ContMix's queries, scaled by ``head_dim ** -0.5`` (the fused block has the scale in its weights)."""
        return self.weight_query(query_src) * self.scale

    cache_biases = False  # set by the fuse step (``reparameterize``)

    def reparameterize(self) -> None:
        """Deploy conversion hook (run by :func:`overlock.fuse` and ``timm.utils.reparameterize_model``): from now
        on inference keeps the window biases per map size (:meth:`_cached_biases`)."""
        self.cache_biases = True

    def train(self, mode: bool = True):
        self.__dict__.pop("_bias_cache", None)
        return super().train(mode)

    def _cached_biases(self, height: int, width: int):
        """:func:`window_biases` for this map size, kept between calls when no gradient is recorded.

        They depend only on parameters (a gather of the position-bias tables), so a fused model computes them once
        per map size (2-3% of a batch-1 forward on CPU otherwise). Only in eval mode, and dropped by every
        ``train()``/``eval()`` call: an optimizer step in between (PyTorch's fused AdamW writes parameters without
        moving their version counters) is never missed. The key holds the version counters too, so loading or
        editing weights in place recomputes them; under autograd they are always recomputed.
        """
        if not self.cache_biases or self.training:
            return None
        params = (self.rpb1, self.rpb2, self.weight_proj.bias)
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return None
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return None
        key = (height, width, *((*tensor_key(p), p.dtype, p.device) for p in params))
        cache = self.__dict__.setdefault("_bias_cache", {})
        hit = cache.get(key)
        if hit is None:
            with torch.inference_mode(False), torch.no_grad():  # normal tensors: usable in any later mode
                hit = window_biases(*params, height, width, self.smk_size, self.kernel_size)
            if len(cache) >= 8:
                cache.clear()
            cache[key] = hit
        return hit

    def dynamic_conv(self, x: torch.Tensor, mixed_proj: nn.Module, query_src: torch.Tensor,
                     key_src: torch.Tensor, value_proj: nn.Module | None = None) -> torch.Tensor:
        """``proj(gate(x) * SE(mixed_proj(ContMix) + LePE(x)))``: the token mixer of both blocks."""
        gate = self.gate(x)
        lepe = self.lepe(x)
        x = mixed_proj(self.context_mix(query_src, key_src, x, value_proj)) + lepe
        return self.proj(gate * self.se_layer(x))

    def residual(self, identity: torch.Tensor, branch: torch.Tensor, layer_scale: nn.Module) -> torch.Tensor:
        """``ls(identity) + branch`` with ``res_scale``, else ``identity + ls(branch)`` (drop path on the branch)."""
        if self.res_scale:
            return layer_scale(identity) + self.drop_path(branch)
        return identity + self.drop_path(layer_scale(branch))


def layer_scale(dim: int, init_value) -> nn.Module:
    return LayerScale(dim, init_value) if init_value is not None else nn.Identity()


class ContMixBlock(ContMixCore):
    """The official plug-and-play ContMix block (models/contmix.py): ContMix mixer plus a GRN MLP.

    Same constructor arguments and parameter names as the official block; ``use_gemm`` is accepted and
    ignored (no iGEMM kernels needed). ``num_heads`` is doubled internally, as in the official code.
    """

    def __init__(self, dim: int = 64, kernel_size: int = 7, smk_size: int = 5, num_heads: int = 2,
                 mlp_ratio: float = 4, res_scale: bool = False, ls_init_value=None, drop_path: float = 0.,
                 norm_layer=LayerNorm2d, use_gemm: bool = False, deploy: bool = False,
                 use_checkpoint: bool = False, **kwargs):
        super().__init__()
        self._init_core(dim, dim, dim, kernel_size, smk_size, num_heads, res_scale, drop_path, deploy)
        self.use_checkpoint = use_checkpoint
        self.dwconv1 = ResDWConv(dim, 3)
        self.norm1 = norm_layer(dim)
        self.weight_value = conv_bn(dim, dim)
        self.fusion_proj = conv_bn(dim, dim)
        self.dwconv2 = ResDWConv(dim, 3)
        self.norm2 = norm_layer(dim)
        self.mlp = GrnMlp(dim, int(dim * mlp_ratio))
        self.ls1 = layer_scale(dim, ls_init_value)
        self.ls2 = layer_scale(dim, ls_init_value)
        nn.init.trunc_normal_(self.rpb1, std=0.02)
        nn.init.trunc_normal_(self.rpb2, std=0.02)

    def reparm(self):
        """Official name of the deploy conversion (merges the dilated branches)."""
        for m in self.modules():
            if isinstance(m, (DilatedReparamBlock, ContMixCore)):
                m.reparameterize()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dwconv1(x)
        y = self.norm1(x)
        x = self.residual(x, self.dynamic_conv(y, self.fusion_proj, y, y, self.weight_value), self.ls1)
        x = self.dwconv2(x)
        return self.residual(x, self.mlp(self.norm2(x)), self.ls2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and x.requires_grad:
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)
