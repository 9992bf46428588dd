"""mmdetection's preprocessing for the official Mask R-CNN, as a torchvision ``GeneralizedRCNNTransform``.

Test: keep-ratio resize so that the image fits 1333x800 (mmcv ``imrescale``: new size ``int(w * s + 0.5)``),
bilinear, rounded back to 0-255 integers as mmcv's uint8 resize does; normalise with mmdet's mean/std on
0-255 RGB; zero padding to a multiple of 32. Training: the same, at a scale drawn from ``train_scales``
(mmdet ``multiscale_mode='value'``), boxes and masks scaled with it.
"""
from __future__ import annotations

import random
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform

__all__ = ["MMDetTransform", "MEAN", "STD", "TEST_SCALE", "rescale_size", "to_tensor_255"]

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
TEST_SCALE = (1333, 800)


def rescale_size(w: int, h: int, scale: Tuple[int, int]) -> Tuple[int, int]:
    """mmcv ``rescale_size`` for a (long, short) edge limit: the new (w, h)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(w * float(factor) + 0.5), int(h * float(factor) + 0.5)


def to_tensor_255(image) -> torch.Tensor:
    """A CHW float tensor of 0-255 RGB values from a CHW uint8 tensor, a CHW float tensor in [0, 1], a PIL image
    or an HxWx3 uint8 array."""
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a 3xHxW RGB image tensor, got shape {tuple(image.shape)}")
        return image.float() if image.dtype == torch.uint8 else image.float() * 255.0
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float()


class MMDetTransform(GeneralizedRCNNTransform):
    """Resize, normalise and pad like mmdet; records each image's scale factor (w, h, w, h) and original size
    on the returned ``ImageList`` (``scale_factors``, ``original_sizes``)."""

    def __init__(self, test_scale: Tuple[int, int] = TEST_SCALE,
                 train_scales: Optional[Sequence[Tuple[int, int]]] = None, size_divisor: int = 32):
        super().__init__(min_size=min(test_scale), max_size=max(test_scale), image_mean=list(MEAN),
                         image_std=list(STD), size_divisible=size_divisor)
        self.test_scale = tuple(test_scale)
        self.train_scales = [tuple(s) for s in train_scales] if train_scales else [self.test_scale]

    def _scale(self) -> Tuple[int, int]:
        if not self.training:
            return self.test_scale
        return random.choice(self.train_scales)

    def forward(self, images, targets=None):
        out_images, sizes, factors, originals = [], [], [], []
        targets = [dict(t) for t in targets] if targets is not None else None
        for i, image in enumerate(images):
            img = to_tensor_255(image)
            h, w = img.shape[-2:]
            new_w, new_h = rescale_size(w, h, self._scale())
            if (new_h, new_w) != (h, w):
                img = F.interpolate(img[None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
                img = img.round().clamp_(0, 255)
            factor = torch.tensor([new_w / w, new_h / h, new_w / w, new_h / h], dtype=torch.float32)
            mean = img.new_tensor(MEAN)[:, None, None]
            stdinv = (1 / torch.tensor(STD, dtype=torch.float64)).to(img)[:, None, None]
            out_images.append((img - mean) * stdinv)
            sizes.append((new_h, new_w))
            factors.append(factor)
            originals.append((int(h), int(w)))
            if targets is not None:
                t = targets[i]
                if "boxes" in t:
                    t["boxes"] = t["boxes"] * factor.to(t["boxes"])
                if "masks" in t and t["masks"].numel() and (new_h, new_w) != (h, w):
                    t["masks"] = F.interpolate(t["masks"][:, None].float(), size=(new_h, new_w),
                                               mode="nearest")[:, 0].to(t["masks"].dtype)
                elif "masks" in t:
                    t["masks"] = t["masks"].reshape(-1, new_h, new_w)
        batch = self.batch_images(out_images, size_divisible=self.size_divisible)
        result = ImageList(batch, sizes)
        result.scale_factors = factors
        result.original_sizes = originals
        return result, targets
