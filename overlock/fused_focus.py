"""The Focus-Net block's inference form, :class:`FusedDynamicConvBlock` (built by the fuse step, :mod:`.fused`).

A ``DynamicConvBlock`` runs its projections as small ``Sequential`` s (1x1 conv, folded BatchNorm's
``Identity``, activation) and its four LayerScales as separate passes. At batch 1 on a 14x14 map its GEMMs
are half of the block's time and the other ~100 ops and module calls the rest, so here the block is one flat
forward: the 1x1s are plain ``(Cout, Cin)`` GEMMs on the NHWC view, ContMix's query scale lives in the query
weights, the residual LayerScales fold into the branch's last 1x1 (weight, or just bias with ``res_scale``,
leaving one multiply-add with the identity), the two context LayerScales are two multiply-adds, ``dyconv_proj``'s
GEMM accumulates into LePE's output (its bias folded into LePE's), the gate's SiLU and product are one pass, and fresh
outputs are updated in place when no gradient is recorded. Same function as the exact block in eval mode.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from . import fused_native
from .contmix import ContMixCore
from .fused import (FusedGrnMlp, NativeRouteCache, _conv_then_gelu, _conv_then_norm_identity, _fuse_children,
                    _inplace_ok, _param, _records_grad, _tracing, gemm_param, grn_scale, pointwise_scaled_add)
from .layers import LayerScale
from .ops import native

__all__ = ["FusedDynamicConvBlock"]


def _linear_nhwc(x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """A 1x1 conv as one GEMM on the NHWC view (what ``PointwiseConv`` does on channels-innermost maps)."""
    if x.dim() == 4 and (x.stride(1) == 1 or x.is_contiguous(memory_format=torch.channels_last)):
        return F.linear(x.permute(0, 2, 3, 1), weight, bias).permute(0, 3, 1, 2)
    return F.conv2d(x, weight[:, :, None, None], bias)


def _linear_add(x: torch.Tensor, weight: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """``acc + 1x1(x)`` (no bias); without autograd the GEMM accumulates straight into ``acc``'s NHWC view (a fresh
    channels_last map): no separate add pass, no bias copy."""
    if (not _records_grad(x, weight, acc) and not _tracing() and x.dim() == 4 and acc.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last)
            and acc.is_contiguous(memory_format=torch.channels_last) and x.dtype == acc.dtype == weight.dtype):
        acc.permute(0, 2, 3, 1).view(-1, acc.shape[1]).addmm_(x.permute(0, 2, 3, 1).view(-1, x.shape[1]), weight.t())
        return acc
    return acc + _linear_nhwc(x, weight, None)


def _native_here(x: torch.Tensor) -> bool:
    return not _tracing() and x.device.type == "cpu" and native.used_here()


def _silu_mul(gate: torch.Tensor, x: torch.Tensor, bias=None) -> torch.Tensor:
    """``SiLU(gate + bias) * x`` (``bias`` per channel, or None): in place on a fresh ``gate``, in one native pass
    where the kernel runs."""
    if _records_grad(gate, x, bias):
        return F.silu(gate if bias is None else gate + bias.view(1, -1, 1, 1)) * x
    if _native_here(gate) and native.silu_mul_(gate, x, bias):
        return gate
    if bias is not None:
        gate = gate.add_(bias.view(1, -1, 1, 1))
    return F.silu(gate, inplace=True).mul_(x)


def _grn(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, bias=None) -> torch.Tensor:
    """``GRN(x + bias)`` (``bias`` per channel, or None), on a fresh ``x`` in place without autograd: where the kernel
    runs, the bias is added in the pass that takes GRN's statistics."""
    if not _records_grad(x, gamma, beta, bias) and _inplace_ok(x):
        scale = native.grn_scale(x, gamma, bias) if _native_here(x) else None
        if scale is None:
            if bias is not None:
                x = x.add_(bias.view(1, -1, 1, 1))
            scale = grn_scale(gamma, x)
        return torch.addcmul(beta, x, scale, out=x)
    if bias is not None:
        x = x + bias.view(1, -1, 1, 1)
    return torch.addcmul(beta, x, grn_scale(gamma, x))


def _pointwise(seq: nn.Module):
    """``(weight (Cout, Cin), bias)`` of the one 1x1 conv in a fused ``[1x1, Identity]`` or ``[Identity, 1x1]``."""
    convs = [m for m in seq.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and convs[0].kernel_size == (1, 1), seq
    conv = convs[0]
    return gemm_param(conv.weight.flatten(1), conv.weight), conv.bias


class FusedDynamicConvBlock(NativeRouteCache, ContMixCore):
    """``DynamicConvBlock`` for inference (see the module docstring); ``forward(x, ctx, ctx_prior)`` as there."""

    def __init__(self, block: nn.Module):
        super().__init__()
        for name in ("dim", "ctx_dim", "is_first", "is_last", "kernel_size", "smk_size", "num_heads", "res_scale"):
            setattr(self, name, getattr(block, name))
        self.cache_biases = True
        ls1 = block.ls1 if isinstance(block.ls1, LayerScale) else None
        ls2 = block.ls2 if isinstance(block.ls2, LayerScale) else None
        self.mlp = FusedGrnMlp(block.mlp, layer_scale=None if self.res_scale else ls2)
        parts = copy.deepcopy(nn.ModuleDict({name: getattr(block, name) for name in (
            "dwconv1", "norm1", "fusion", "gate", "lepe", "weight_query", "weight_key", "dyconv_proj",
            "se_layer", "proj", "dwconv2", "norm2")}))
        _fuse_children(parts)
        self.rpb1, self.rpb2, self.weight_proj = block.rpb1, block.rpb2, block.weight_proj
        self.dwconv1, self.norm1, self.dwconv2, self.norm2 = (parts[n] for n in ("dwconv1", "norm1", "dwconv2",
                                                                                  "norm2"))
        if not self.is_first:  # ctx = x_scale(ctx) + h_scale(ctx_prior)
            self.ctx_weight = _param(block.x_scale.weight.view(1, -1, 1, 1), block.x_scale.weight)
            self.prior_weight = _param(block.h_scale.weight.view(1, -1, 1, 1), block.h_scale.weight)
            self.ctx_bias = _param((block.x_scale.bias + block.h_scale.bias).view(1, -1, 1, 1), block.x_scale.bias)
        # fusion = [dw 3x3 (+BN), Identity, GELU, 1x1, GRN]
        fusion_dw, _, act, fusion_pw, grn = parts["fusion"]
        self.fusion_dw, self.approximate = fusion_dw, act.approximate
        self.fusion_weight, self.fusion_bias = _pointwise(fusion_pw)
        self.grn_gamma, self.grn_beta = grn.gamma, grn.beta
        self.gate_weight, self.gate_bias = _pointwise(parts["gate"])
        self.lepe = parts["lepe"][0]
        w, b = _pointwise(parts["weight_query"])
        self.query_weight, self.query_bias = gemm_param(w * block.scale, w), _param(b * block.scale, w)
        self.weight_key = nn.Sequential(*(m for m in parts["weight_key"] if not isinstance(m, nn.Identity)))
        # dyconv_proj(cm) + lepe(h): dyconv_proj's bias goes into LePE's, and its GEMM accumulates into LePE's output
        self.dyconv_weight, dyconv_bias = _pointwise(parts["dyconv_proj"])
        if dyconv_bias is not None:
            lepe_bias = dyconv_bias if self.lepe.bias is None else self.lepe.bias + dyconv_bias
            self.lepe.bias = _param(lepe_bias, dyconv_bias)
        self.se = parts["se_layer"]
        w, b = _pointwise(parts["proj"])
        self.ls1_weight = self.ls2_weight = None
        if ls1 is not None and not self.res_scale:  # identity + ls1(proj(.)): ls1 goes into proj
            w, b = w * ls1.weight.view(-1, 1), torch.addcmul(ls1.bias, b, ls1.weight.view(-1))
        elif ls1 is not None:  # ls1(identity) + proj(.): the shift into proj's bias, the scale stays
            b = b + ls1.bias
            self.ls1_weight = _param(ls1.weight.view(1, -1, 1, 1), ls1.weight)
        self.proj_weight, self.proj_bias = gemm_param(w, w), _param(b, w)
        if ls2 is not None and self.res_scale:
            with torch.no_grad():
                self.mlp.fc2_bias.add_(ls2.bias)
            self.ls2_weight = _param(ls2.weight.view(1, -1, 1, 1), ls2.weight)

    def query(self, query_src: torch.Tensor) -> torch.Tensor:
        return _linear_nhwc(query_src, self.query_weight, self.query_bias)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_prior: torch.Tensor):
        out = fused_native.focus_block(self, x, ctx, ctx_prior)  # inference on CPU: one straight-line call
        if out is not None:
            return out
        fused, y, prepared = _conv_then_norm_identity(self.dwconv1, self.norm1, self._input(x, ctx, ctx_prior),
                                                      self.ls1_weight, self.proj_bias)
        query_src, key_src = y.split([self.dim, self.ctx_dim], dim=1)
        x = self._mixer(y, query_src, key_src, fused, prepared)
        x, y, prepared = _conv_then_norm_identity(self.dwconv2, self.norm2, x, self.ls2_weight, self.mlp.fc2_bias)
        x = self.mlp.forward_add(y, x, self.ls2_weight, prepared=prepared)
        if self.is_last:
            return x, None
        x, ctx = x.split([self.dim, self.ctx_dim], dim=1)
        return x, ctx

    def _input(self, x: torch.Tensor, ctx: torch.Tensor, ctx_prior: torch.Tensor) -> torch.Tensor:
        """``[x, ctx]``, the context first updated to ``x_scale(ctx) + h_scale(ctx_prior)`` (not in the first block):
        one native pass where it runs."""
        if self.is_first:
            return torch.cat([x, ctx], dim=1)
        if _native_here(x):
            out = native.context_concat(x, ctx, ctx_prior, self.ctx_weight, self.prior_weight, self.ctx_bias)
            if out is not None:
                return out
        ctx = torch.addcmul(self.ctx_bias, ctx, self.ctx_weight)
        ctx = ctx.addcmul_(ctx_prior, self.prior_weight) if _inplace_ok(ctx) else \
            torch.addcmul(ctx, ctx_prior, self.prior_weight)
        return torch.cat([x, ctx], dim=1)

    def _mixer(self, y: torch.Tensor, query_src: torch.Tensor, key_src: torch.Tensor, identity: torch.Tensor,
               prepared: bool = False) -> torch.Tensor:
        """``identity * ls1 + proj(gate(h) * SE(dyconv_proj(ContMix(h)) + LePE(h)))`` with ``h = fusion(y)``;
        ``prepared``: ``identity`` is already ``identity * ls1 + proj's bias``."""
        h = _conv_then_gelu(self.fusion_dw, y, self.approximate)
        # the fusion and gate 1x1s' biases are added by the passes after their GEMMs (no bias copy into the output)
        h = _grn(_linear_nhwc(h, self.fusion_weight, None), self.grn_gamma, self.grn_beta, self.fusion_bias)
        gate = _linear_nhwc(h, self.gate_weight, None)
        mixed = _linear_add(self.context_mix(query_src, key_src, h), self.dyconv_weight, self.lepe(h))
        scale = self.se.scale(mixed)
        gated = _silu_mul(gate, mixed, self.gate_bias)
        if prepared:
            return pointwise_scaled_add(self.proj_weight, None, gated, identity, scale=scale)
        return pointwise_scaled_add(self.proj_weight, self.proj_bias, gated, identity, scale=scale,
                                    identity_weight=self.ls1_weight)

