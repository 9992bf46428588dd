"""Test-time preprocessing and inference as the official mmseg test config does it.

- ``preprocess``: keep-ratio resize so that the image fits (2048, 512) (long side <= 2048, short side <= 512;
  bilinear), then to the next multiple of 32 (bicubic), each rounded back to uint8 as mmcv/OpenCV does, then
  ImageNet mean/std normalisation. torch's bilinear/bicubic kernels (no antialiasing, half-pixel centres,
  cubic a=-0.75) are OpenCV's, so the network input matches mmseg's up to a rounding of single pixels.
- ``infer``: whole-image (the official mode) or sliding-window logits, resized back to the original image
  (bilinear, ``align_corners=False``).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["MEAN", "STD", "preprocess", "normalize", "infer", "slide_logits", "rescale_size"]

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def rescale_size(w: int, h: int, scale: Sequence[int] = (2048, 512)) -> Tuple[int, int]:
    """mmcv ``rescale_size`` for a (long, short) bound: the largest keep-ratio size within it."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(w * factor + 0.5), int(h * factor + 0.5)


def _resize_uint8(x: torch.Tensor, size: Tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    kw = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(x, size=size, mode=mode, **kw).round_().clamp_(0, 255)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float RGB in 0..255 -> normalised with the ImageNet mean and std of the official config."""
    mean = torch.tensor(MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def preprocess(image: np.ndarray, scale: Optional[Sequence[int]] = (2048, 512), divisor: int = 32) -> torch.Tensor:
    """uint8 RGB ``HxWx3`` -> normalised ``(1, 3, h, w)`` float tensor (``scale=None``: no resize)."""
    x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None]
    h, w = image.shape[:2]
    if scale is not None:
        nw, nh = rescale_size(w, h, scale)
        x = _resize_uint8(x, (nh, nw), "bilinear")
        h, w = nh, nw
    if divisor > 1:
        x = _resize_uint8(x, (-(-h // divisor) * divisor, -(-w // divisor) * divisor), "bicubic")
    return normalize(x)


def slide_logits(model, x: torch.Tensor, crop: Tuple[int, int] = (512, 512), stride: Tuple[int, int] = (341, 341),
                 num_classes: Optional[int] = None) -> torch.Tensor:
    """mmseg ``slide_inference``: overlapping crops, each segmented whole, logits averaged where they overlap."""
    (ch, cw), (sh, sw) = crop, stride
    b, _, h, w = x.shape
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    out, count = None, x.new_zeros((b, 1, h, w))
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, h), min(c * sw + cw, w)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            logits = model(x[:, :, y1:y2, x1:x2])
            if out is None:
                out = x.new_zeros((b, logits.shape[1], h, w))
            out[:, :, y1:y2, x1:x2] += logits
            count[:, :, y1:y2, x1:x2] += 1
    return out / count


def infer(model, x: torch.Tensor, size: Tuple[int, int], mode: str = "whole", crop: Tuple[int, int] = (512, 512),
          stride: Tuple[int, int] = (341, 341)) -> torch.Tensor:
    """Logits ``(B, classes, *size)`` for a normalised batch ``x``; ``size`` is the original (H, W)."""
    if mode == "whole":
        logits = model(x)
    elif mode == "slide":
        logits = slide_logits(model, x, crop, stride)
    else:
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    return logits
