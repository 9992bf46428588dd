"""Dense-prediction backbones of the official detection (Mask R-CNN) and segmentation (UperNet) code.

Both return four maps at strides 4, 8, 16 and 32, each through its own LayerNorm (``extra_norm.0-3``).
Unlike the classifier, stage 3 reads the *normalised* stride-8 map (``extra_norm.1``), as the official
dense code does. The stride-16 map is the Focus-Net features concatenated with their context channels; the stride-32 map is
the final Focus-Net output. The detection backbone also adds the normalised Overview-Net context prior,
projected by ``h_proj`` (1x1 conv + layer scale), to the stride-32 map.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from ..layers import LayerNorm2d, LayerScale
from .overlock import OverLoCK

__all__ = ["OverLoCKDense", "DENSE_KINDS"]

DENSE_KINDS = ("detection", "segmentation")


class OverLoCKDense(OverLoCK):
    """OverLoCK without classification heads, returning multi-scale features; ``out_channels`` lists them."""

    def __init__(self, kind: str = "detection", norm_layer=LayerNorm2d, **kwargs):
        if kind not in DENSE_KINDS:
            raise ValueError(f"kind must be one of {DENSE_KINDS}, got {kind!r}")
        kwargs.pop("num_classes", None)
        kwargs.pop("use_ds", None)
        super().__init__(num_classes=0, use_ds=False, norm_layer=norm_layer, **kwargs)
        self.kind = kind
        del self.head
        embed_dim = self.embed_dim
        ctx_dim = embed_dim[-1] // 4
        self.out_channels = [embed_dim[0], embed_dim[1], embed_dim[2] + ctx_dim, embed_dim[3] + ctx_dim]
        if kind == "detection":
            self.h_proj = nn.Sequential(nn.Conv2d(embed_dim[-1], self.out_channels[3], 1),
                                        LayerScale(self.out_channels[3], init_value=1e-5))
        self.extra_norm = nn.ModuleList(norm_layer(c) for c in self.out_channels)
        if kind == "detection":
            self.extra_norm.append(norm_layer(embed_dim[-1]))
        self.extra_norm.apply(self._init_weights)
        if kind == "detection":
            self.h_proj.apply(self._init_weights)

    def forward_head(self, x, pre_logits: bool = False):
        raise RuntimeError("dense backbones have no classification head")

    def reset_classifier(self, num_classes: int, global_pool=None) -> None:
        raise RuntimeError("dense backbones have no classification head")

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        s1, s2 = self.forward_pre(x)
        s2 = self.extra_norm[1](s2)  # as in the official code, stage 3 reads the normalised stage-2 map
        x3, ctx = self.forward_overview(s2)
        s3, x4 = self.forward_focus(x3, ctx)
        outs = [self.extra_norm[0](s1), s2, self.extra_norm[2](s3), self.extra_norm[3](x4)]
        if self.kind == "detection":
            outs[3] = outs[3] + self.h_proj(self.extra_norm[4](ctx))
        return outs
