"""The two OverLoCK blocks: ``RepConvBlock`` (Base-Net and Overview-Net) and ``DynamicConvBlock`` (Focus-Net)."""
from __future__ import annotations

import torch
from timm.layers import DropPath
from torch import nn

from ..contmix import ContMixCore, layer_scale
from ..ops.gelu import GELU
from ..layers import (GRN, ConvNorm, DilatedReparamBlock, GrnMlp, LayerNorm2d, LayerScale, PointwiseConv, ResDWConv,
                      SEModule, grn_mlp)

__all__ = ["RepConvBlock", "DynamicConvBlock"]


class RepConvBlock(nn.Module):
    """Residual depthwise conv, then norm -> dilated large-kernel conv -> BN -> SE -> GRN MLP.

    ``proj`` keeps the official flat layout (``proj.0`` ... ``proj.9``); ``fuse()`` returns the inference form
    (:class:`overlock.fused.FusedRepConvBlock`).
    """

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
            *GrnMlp(dim, mlp_dim),
            DropPath(drop_path) if drop_path > 0 else nn.Identity(),
        )
        self.ls = layer_scale(dim, ls_init_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dwconv(x)
        p = self.proj
        y = grn_mlp(p[4:9], p[3](p[2](p[1](p[0](x)))))
        if self.res_scale:
            return self.ls(x) + p[9](y)
        return x + p[9](self.ls(y))

    def fuse(self) -> nn.Module:
        from ..fused import FusedRepConvBlock
        return FusedRepConvBlock(self).train(self.training)


class DynamicConvBlock(ContMixCore):
    """Focus-Net block: fuse features with the context prior, mix space with ContMix, then a GRN MLP.

    ``forward(x, ctx, ctx_prior)`` returns ``(x, ctx)``: the updated features and context (the context is
    carried in the last ``ctx_dim // 4`` channels), or ``(features_and_context, None)`` for the last block.
    Queries come from the features, ContMix keys from the context channels. ``fuse()`` returns the inference
    form (:class:`overlock.fused_focus.FusedDynamicConvBlock`).
    """

    def __init__(self, dim: int, ctx_dim: int, kernel_size: int = 7, smk_size: int = 5, num_heads: int = 2,
                 mlp_ratio: float = 4, ls_init_value=None, res_scale: bool = False, drop_path: float = 0.,
                 norm_layer=LayerNorm2d, is_first: bool = False, is_last: bool = False, deploy: bool = False):
        super().__init__()
        ctx_dim = ctx_dim // 4
        out_dim = dim + ctx_dim
        self._init_core(dim, ctx_dim, out_dim, kernel_size, smk_size, num_heads, res_scale, drop_path, deploy)
        self.dim, self.ctx_dim = dim, ctx_dim
        self.is_first, self.is_last = is_first, is_last
        if not is_first:
            self.x_scale = LayerScale(ctx_dim, init_value=1)
            self.h_scale = LayerScale(ctx_dim, init_value=1)
        self.dwconv1 = ResDWConv(out_dim, 3)
        self.norm1 = norm_layer(out_dim)
        self.fusion = ConvNorm(
            nn.Conv2d(out_dim, out_dim, 3, padding=1, groups=out_dim), nn.BatchNorm2d(out_dim), GELU(),
            PointwiseConv(out_dim, dim), GRN(dim))
        self.dyconv_proj = ConvNorm(PointwiseConv(dim, dim, bias=False), nn.BatchNorm2d(dim))
        self.dwconv2 = ResDWConv(out_dim, 3)
        self.norm2 = norm_layer(out_dim)
        self.mlp = GrnMlp(out_dim, int(dim * mlp_ratio))
        self.ls1 = layer_scale(out_dim, ls_init_value)
        self.ls2 = layer_scale(out_dim, ls_init_value)

    def fuse(self) -> nn.Module:
        from ..fused_focus import FusedDynamicConvBlock
        return FusedDynamicConvBlock(self).train(self.training)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_prior: torch.Tensor):
        if not self.is_first:
            ctx = self.x_scale(ctx) + self.h_scale(ctx_prior)
        fused = self.dwconv1(torch.cat([x, ctx], dim=1))
        y = self.norm1(fused)
        query_src, key_src = y.split([self.dim, self.ctx_dim], dim=1)
        branch = self.dynamic_conv(self.fusion(y), self.dyconv_proj, query_src, key_src)
        x = self.residual(fused, branch, self.ls1)
        x = self.dwconv2(x)
        x = self.residual(x, self.mlp(self.norm2(x)), self.ls2)
        if self.is_last:
            return x, None
        x, ctx = x.split([self.dim, self.ctx_dim], dim=1)
        return x, ctx

