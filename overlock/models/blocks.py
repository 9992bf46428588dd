"""The two OverLoCK blocks: ``RepConvBlock`` (Base-Net and Overview-Net) and ``DynamicConvBlock`` (Focus-Net)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from ..contmix import context_mix, make_rpb, upsampled_size
from ..layers import (GRN, PointwiseConv, DilatedReparamBlock, LayerNorm2d, LayerScale, ResDWConv, SEModule,
                      grn_pointwise, inference_fast_path, mlp_forward, pointwise_scaled, sequential_forward)

__all__ = ["RepConvBlock", "DynamicConvBlock", "batch_chunked"]

CHUNK_BYTES = 8 << 20  # largest intermediate map per batch chunk on the inference fast path


def batch_chunked(fn, x: torch.Tensor, bytes_per_sample: int) -> torch.Tensor:
    """``fn(x)`` for a per-sample ``fn``, run on batch chunks of at most ``CHUNK_BYTES`` of intermediates."""
    n = max(1, CHUNK_BYTES // max(bytes_per_sample, 1))
    if n >= x.shape[0]:
        return fn(x)
    return torch.cat([fn(c) for c in x.split(n)])


def _call(module, *args):
    return module(*args)


class RepConvBlock(nn.Module):
    """Residual depthwise conv, then norm -> dilated large-kernel conv -> BN -> SE -> GRN MLP."""

    def __init__(self, dim: int, kernel_size: int = 7, mlp_ratio: float = 4, ls_init_value=None,
                 res_scale: bool = False, drop_path: float = 0., norm_layer=LayerNorm2d, deploy: bool = False):
        super().__init__()
        mlp_dim = int(dim * mlp_ratio)
        self.res_scale = res_scale
        self.dwconv = ResDWConv(dim, 3)
        self.proj = nn.Sequential(
            norm_layer(dim),
            DilatedReparamBlock(dim, kernel_size, deploy=deploy),
            nn.BatchNorm2d(dim),
            SEModule(dim),
            PointwiseConv(dim, mlp_dim),
            nn.GELU(),
            ResDWConv(mlp_dim, 3),
            GRN(mlp_dim),
            PointwiseConv(mlp_dim, dim),
            DropPath(drop_path) if drop_path > 0 else nn.Identity(),
        )
        self.ls = LayerScale(dim, ls_init_value) if ls_init_value is not None else nn.Identity()

    def _proj_fast(self, x: torch.Tensor) -> torch.Tensor:
        """``proj`` without autograd: SE gate folded into the first 1x1, GRN into the second (no DropPath in eval)."""
        p = self.proj
        x = sequential_forward(p[1:3], p[0](x))
        x = pointwise_scaled(p[4], x, scale=p[3].scale(x), gelu=p[5].approximate)
        return grn_pointwise(p[7], p[8], p[6](x))

    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dwconv(x)
        return self.ls(x) + self._proj_fast(x) if self.res_scale else x + self.ls(self._proj_fast(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if inference_fast_path(self, x):
            # every op is per sample in eval: run in batch chunks whose 4x-wide MLP maps stay small enough
            # for the allocator to reuse (fresh multi-MB buffers cost a page fault per 4 KB on first touch)
            return batch_chunked(self._forward_fast, x, x[:1].numel() * 4 * self.proj[4].out_channels // x.shape[1])
        x = self.dwconv(x)
        if self.res_scale:
            return self.ls(x) + self.proj(x)
        return x + self.proj[-1](self.ls(self.proj[:-1](x)))


class DynamicConvBlock(nn.Module):
    """Focus-Net block: fuse features with the context prior, mix space with ContMix, then a GRN MLP.

    ``forward(x, ctx, ctx_prior)`` returns ``(x, ctx)``: the updated features and context (the context is
    carried in the last ``ctx_dim // 4`` channels), or ``(features_and_context, None)`` for the last block.
    """

    def __init__(self, dim: int, ctx_dim: int, kernel_size: int = 7, smk_size: int = 5, num_heads: int = 2,
                 mlp_ratio: float = 4, ls_init_value=None, res_scale: bool = False, drop_path: float = 0.,
                 norm_layer=LayerNorm2d, is_first: bool = False, is_last: bool = False, deploy: bool = False):
        super().__init__()
        ctx_dim = ctx_dim // 4
        out_dim = dim + ctx_dim
        mlp_dim = int(dim * mlp_ratio)
        self.dim, self.ctx_dim = dim, ctx_dim
        self.kernel_size = kernel_size
        self.smk_size = smk_size
        self.num_heads = num_heads * 2
        self.scale = (dim // self.num_heads) ** -0.5
        self.res_scale = res_scale
        self.is_first, self.is_last = is_first, is_last

        self.rpb1 = make_rpb(self.num_heads, smk_size)
        self.rpb2 = make_rpb(self.num_heads, kernel_size)
        if not is_first:
            self.x_scale = LayerScale(ctx_dim, init_value=1)
            self.h_scale = LayerScale(ctx_dim, init_value=1)
        self.dwconv1 = ResDWConv(out_dim, 3)
        self.norm1 = norm_layer(out_dim)
        self.fusion = nn.Sequential(
            nn.Conv2d(out_dim, out_dim, 3, padding=1, groups=out_dim), nn.BatchNorm2d(out_dim), nn.GELU(),
            PointwiseConv(out_dim, dim), GRN(dim))
        self.weight_query = nn.Sequential(PointwiseConv(dim, dim // 2, bias=False), nn.BatchNorm2d(dim // 2))
        self.weight_key = nn.Sequential(nn.AdaptiveAvgPool2d(7), PointwiseConv(ctx_dim, dim // 2, bias=False),
                                        nn.BatchNorm2d(dim // 2))
        self.weight_proj = PointwiseConv(49, kernel_size ** 2 + smk_size ** 2)
        self.dyconv_proj = nn.Sequential(PointwiseConv(dim, dim, bias=False), nn.BatchNorm2d(dim))
        self.lepe = nn.Sequential(DilatedReparamBlock(dim, kernel_size, deploy=deploy), nn.BatchNorm2d(dim))
        self.se_layer = SEModule(dim)
        self.gate = nn.Sequential(PointwiseConv(dim, dim, bias=False), nn.BatchNorm2d(dim), nn.SiLU())
        self.proj = nn.Sequential(nn.BatchNorm2d(dim), PointwiseConv(dim, out_dim))
        self.dwconv2 = ResDWConv(out_dim, 3)
        self.norm2 = norm_layer(out_dim)
        self.mlp = nn.Sequential(
            PointwiseConv(out_dim, mlp_dim), nn.GELU(), ResDWConv(mlp_dim, 3), GRN(mlp_dim),
            PointwiseConv(mlp_dim, out_dim))
        self.ls1 = LayerScale(out_dim, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.ls2 = LayerScale(out_dim, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _mix(self, x: torch.Tensor, fused: torch.Tensor) -> torch.Tensor:
        """ContMix with queries from the features and keys from the context part of ``fused``."""
        H, W = x.shape[-2:]
        resized = min(H, W) < self.kernel_size
        if resized:
            size = upsampled_size(H, W, self.kernel_size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            fused = F.interpolate(fused, size=size, mode="bilinear", align_corners=False)
        query, key = fused.split([self.dim, self.ctx_dim], dim=1)
        seq = sequential_forward if inference_fast_path(self, query) else _call
        out = context_mix(seq(self.weight_query, query) * self.scale, seq(self.weight_key, key), x, self.weight_proj,
                          self.rpb1, self.rpb2, self.smk_size, self.kernel_size, self.num_heads)
        if resized:
            out = F.adaptive_avg_pool2d(out, (H, W))
        return out

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_prior: torch.Tensor):
        if not self.is_first:
            ctx = self.x_scale(ctx) + self.h_scale(ctx_prior)
        fused = self.dwconv1(torch.cat([x, ctx], dim=1))
        identity = fused
        fused = self.norm1(fused)
        seq = sequential_forward if inference_fast_path(self, fused) else _call
        x = seq(self.fusion, fused)
        gate = seq(self.gate, x)
        lepe = seq(self.lepe, x)
        x = seq(self.dyconv_proj, self._mix(x, fused)).add_(lepe) if seq is not _call \
            else self.dyconv_proj(self._mix(x, fused)) + lepe
        x = seq(self.proj, gate * self.se_layer(x))
        if self.res_scale:
            x = self.ls1(identity) + self.drop_path(x)
        else:
            x = identity + self.drop_path(self.ls1(x))
        x = self.dwconv2(x)
        mlp = mlp_forward if inference_fast_path(self, x) else _call
        if self.res_scale:
            x = self.ls2(x) + self.drop_path(mlp(self.mlp, self.norm2(x)))
        else:
            x = x + self.drop_path(self.ls2(mlp(self.mlp, self.norm2(x))))
        if self.is_last:
            return x, None
        x, ctx = x.split([self.dim, self.ctx_dim], dim=1)
        return x, ctx
