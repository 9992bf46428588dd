"""The exact dense (segmentation-form) backbone as timm models, for hosts that build encoders with timm.

``timm.create_model("dense_overlock_t", features_only=True)`` returns the four maps of the official UperNet
backbone (strides 4-32, with its ``extra_norm`` layers), so e.g.
``segmentation_models_pytorch.UPerNet(encoder_name="tu-dense_overlock_t", encoder_weights=None)`` sits on the
same features as the official model (the classification-form ``tu-overlock_t`` lacks those norms and reads
un-normalised stage-2 maps). ``pretrained_cfg_overlay=dict(file=PATH)`` with ``pretrained=True`` loads an official
UperNet/Mask R-CNN (``backbone.`` keys) or ImageNet checkpoint. ``kind="detection"`` gives the Mask R-CNN form.
The names do not start with ``overlock`` so that ``timm.list_models("overlock*")`` keeps listing classifiers.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from timm.models import register_model
from timm.models._features import FeatureInfo

from ..models.dense import OverLoCKDense
from .model import dense_backbone

__all__ = ["DenseFeatures"]


class DenseFeatures(OverLoCKDense):
    """OverLoCKDense returning the maps at ``out_indices``; has timm's ``feature_info``."""

    def select(self, out_indices: Sequence[int]) -> "DenseFeatures":
        self.out_indices = tuple(out_indices)
        info = [dict(num_chs=c, reduction=2 ** (i + 2), module=f"extra_norm.{i}")
                for i, c in enumerate(self.out_channels)]
        self.feature_info = FeatureInfo(info, self.out_indices)
        return self

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        outs = super().forward(x)
        return [outs[i] for i in self.out_indices]


def _create(name: str, pretrained: bool = False, features_only: bool = True, out_indices=(0, 1, 2, 3),
            in_chans: int = 3, kind: str = "segmentation", pretrained_cfg_overlay=None, **kwargs) -> DenseFeatures:
    if in_chans != 3:
        raise ValueError(f"dense_{name}: in_chans={in_chans} is not supported (OverLoCK takes 3-channel images)")
    if not features_only:
        raise ValueError(f"dense_{name} is a features-only model: pass features_only=True (or use timm's {name})")
    if any(i not in range(4) for i in out_indices):
        raise ValueError(f"dense_{name}: out_indices must be in 0..3 (strides 4, 8, 16, 32), got {out_indices}")
    for key in ("pretrained_cfg", "cache_dir", "output_stride"):
        if key == "output_stride" and kwargs.get(key, 32) != 32:
            raise ValueError(f"dense_{name}: output_stride {kwargs[key]} is not supported (only 32)")
        kwargs.pop(key, None)
    checkpoint = None
    if pretrained:
        checkpoint = (pretrained_cfg_overlay or {}).get("file")
        if not checkpoint:
            raise ValueError(f"dense_{name}: pretrained=True needs a local file: "
                             "pretrained_cfg_overlay=dict(file='upernet_or_imagenet_checkpoint.pth')")
    model = dense_backbone(name, kind=kind, checkpoint=checkpoint, **kwargs)
    model.__class__ = DenseFeatures  # same parameters and buffers; adds output selection and feature_info
    return model.select(out_indices)


@register_model
def dense_overlock_xt(pretrained: bool = False, **kwargs) -> DenseFeatures:
    return _create("overlock_xt", pretrained, **kwargs)


@register_model
def dense_overlock_t(pretrained: bool = False, **kwargs) -> DenseFeatures:
    return _create("overlock_t", pretrained, **kwargs)


@register_model
def dense_overlock_s(pretrained: bool = False, **kwargs) -> DenseFeatures:
    return _create("overlock_s", pretrained, **kwargs)


@register_model
def dense_overlock_b(pretrained: bool = False, **kwargs) -> DenseFeatures:
    return _create("overlock_b", pretrained, **kwargs)


@register_model
def dense_test_overlock(pretrained: bool = False, **kwargs) -> DenseFeatures:
    """The tiny test configuration (no weights), for fast tests of hosts."""
    return _create("test_overlock", pretrained, **kwargs)
