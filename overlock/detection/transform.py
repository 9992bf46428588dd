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


def _resize(img: torch.Tensor, target: Optional[dict], scale: Tuple[int, int]):
    """Keep-ratio resize of a 0-255 CHW image (rounded like mmcv's uint8 result) and its target."""
    h, w = img.shape[-2:]
    new_w, new_h = rescale_size(w, h, scale)
    if (new_h, new_w) != (h, w):
        img = F.interpolate(img[None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
        img = img.round().clamp_(0, 255)
    factor = torch.tensor([new_w / w, new_h / h, new_w / w, new_h / h], dtype=torch.float32)
    if target is not None:
        if "boxes" in target:
            target["boxes"] = target["boxes"] * factor.to(target["boxes"])
        if "masks" in target and target["masks"].numel() and (new_h, new_w) != (h, w):
            target["masks"] = F.interpolate(target["masks"][:, None].float(), size=(new_h, new_w),
                                            mode="nearest")[:, 0].to(target["masks"].dtype)
        elif "masks" in target:
            target["masks"] = target["masks"].reshape(-1, new_h, new_w)
    return img, factor


def _random_crop(img: torch.Tensor, target: dict, size_range: Tuple[int, int]):
    """mmdet ``RandomCrop(crop_type='absolute_range', allow_negative_crop=True)``: boxes clipped to the crop,
    those left without area dropped with their masks and labels."""
    h, w = img.shape[-2:]
    crop_h = int(np.random.randint(min(h, size_range[0]), min(h, size_range[1]) + 1))
    crop_w = int(np.random.randint(min(w, size_range[0]), min(w, size_range[1]) + 1))
    y0 = int(np.random.randint(0, max(h - crop_h, 0) + 1))
    x0 = int(np.random.randint(0, max(w - crop_w, 0) + 1))
    img = img[:, y0:y0 + crop_h, x0:x0 + crop_w]
    boxes = target["boxes"] - target["boxes"].new_tensor([x0, y0, x0, y0])
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, img.shape[-1])
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, img.shape[-2])
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    target["boxes"] = boxes[valid]
    for key in ("labels", "masks"):
        if key in target:
            target[key] = target[key][valid]
    if "masks" in target:
        target["masks"] = target["masks"][:, y0:y0 + crop_h, x0:x0 + crop_w]
    return img


class MMDetTransform(GeneralizedRCNNTransform):
    """Resize, normalise and pad like mmdet; records each image's scale factor (w, h, w, h) and original size
    on the returned ``ImageList`` (``scale_factors``, ``original_sizes``).

    ``crop_aug`` adds the official 3x recipe's second augmentation policy (chosen with probability 1/2):
    resize to a short edge of 400/500/600, random crop of 384-600 pixels per side, then the multi-scale
    resize."""

    def __init__(self, test_scale: Tuple[int, int] = TEST_SCALE,
                 train_scales: Optional[Sequence[Tuple[int, int]]] = None, size_divisor: int = 32,
                 crop_aug: bool = False):
        super().__init__(min_size=min(test_scale), max_size=max(test_scale), image_mean=list(MEAN),
                         image_std=list(STD), size_divisible=size_divisor)
        self.test_scale = tuple(test_scale)
        self.train_scales = [tuple(s) for s in train_scales] if train_scales else [self.test_scale]
        self.crop_aug = crop_aug

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
            target = targets[i] if targets is not None else None
            if self.training and self.crop_aug and target is not None and np.random.randint(2):
                img, _ = _resize(img, target, random.choice([(1333, 400), (1333, 500), (1333, 600)]))
                img = _random_crop(img, target, (384, 600))
            img, factor = _resize(img, target, self._scale())
            mean = img.new_tensor(MEAN)[:, None, None]
            stdinv = (1 / torch.tensor(STD, dtype=torch.float64)).to(img)[:, None, None]
            out_images.append((img - mean) * stdinv)
            sizes.append(tuple(img.shape[-2:]))
            factors.append(factor)
            originals.append((int(h), int(w)))
        batch = self.batch_images(out_images, size_divisible=self.size_divisible)
        result = ImageList(batch, sizes)
        result.scale_factors = factors
        result.original_sizes = originals
        return result, targets
