"""UperNet decode head and FCN auxiliary head: the functions of mmsegmentation 0.30's ``UPerHead``/``FCNHead``.

Module and parameter names follow mmseg's checkpoint layout (``psp_modules.{i}.1.conv``, ``lateral_convs``,
``fpn_convs``, ``bottleneck``, ``fpn_bottleneck``, ``convs``, ``conv_seg``), so official files load without
renaming. Every resize is bilinear with ``align_corners=False``, as the official configs set.

Why not a library head: transformers' ``UperNetHead`` computes the same eval function (tested in
tests/test_segmentation_model.py when transformers is installed) but has no dropout before the classifier
(the official recipe trains with dropout 0.1) and other parameter names; segmentation_models_pytorch's UPerNet is a
different function (extra norms, ``align_corners=True``).
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvBNReLU", "UPerHead", "FCNHead", "resize"]


def resize(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize with ``align_corners=False`` (the official setting everywhere in the model)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvBNReLU(nn.Module):
    """mmcv ``ConvModule`` with a BatchNorm: conv without bias, norm, ReLU (keys ``conv.*``, ``bn.*``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")  # as mmcv ConvModule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class _Classifier(nn.Module):
    """Dropout then 1x1 conv to the classes (mmseg ``BaseDecodeHead.cls_seg``); weights as mmseg initialises."""

    def __init__(self, channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, 0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def cls_seg(self, feat: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(feat))


class UPerHead(_Classifier):
    """Pyramid pooling on the last map, top-down FPN fusion of all maps, 3x3 fusion conv, classifier.

    Output at the resolution of the first (stride-4) map.
    """

    def __init__(self, in_channels: Sequence[int], channels: int = 512, num_classes: int = 150,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__(channels, num_classes, dropout)
        self.in_channels, self.channels, self.pool_scales = list(in_channels), channels, tuple(pool_scales)
        top = self.in_channels[-1]
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(top, channels, 1)) for s in self.pool_scales)
        self.bottleneck = ConvBNReLU(top + len(self.pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in self.in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in self.in_channels[:-1])
        self.fpn_bottleneck = ConvBNReLU(len(self.in_channels) * channels, channels, 3)

    def _pyramid(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [resize(m(x), x.shape[-2:]) for m in self.psp_modules]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))

    def features(self, inputs: List[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self._pyramid(inputs[len(self.lateral_convs)]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: add the upsampled coarser map
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(laterals[i]) for i, conv in enumerate(self.fpn_convs)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        return self.fpn_bottleneck(torch.cat([resize(o, size) for o in outs], dim=1))

    def forward(self, inputs: List[torch.Tensor]) -> torch.Tensor:
        return self.cls_seg(self.features(inputs))


class FCNHead(_Classifier):
    """Auxiliary head: ``num_convs`` 3x3 conv-BN-ReLU on one backbone level, then the classifier
    (mmseg ``FCNHead`` with ``concat_input=False``, as the official configs use)."""

    def __init__(self, in_channels: int, channels: int = 256, num_classes: int = 150, in_index: int = 2,
                 num_convs: int = 1, dropout: float = 0.1):
        super().__init__(channels, num_classes, dropout)
        self.in_index = in_index
        self.convs = nn.Sequential(*[ConvBNReLU(in_channels if i == 0 else channels, channels, 3)
                                     for i in range(num_convs)])

    def forward(self, inputs: List[torch.Tensor]) -> torch.Tensor:
        return self.cls_seg(self.convs(inputs[self.in_index]))
