"""Masks as files: palette index PNGs (pixel value = class index, colours embedded) and colour overlays."""
from __future__ import annotations

from typing import Dict, List

import numpy as np
from PIL import Image

from .ade20k import palette_for

__all__ = ["colorize", "overlay", "save_index_png", "class_fractions"]


def colorize(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """``HxW`` class indices -> ``HxWx3`` uint8 colours (ADE20K palette; 255 = ignore -> black)."""
    table = np.zeros((max(num_classes, 256), 3), np.uint8)
    table[:num_classes] = np.array(palette_for(num_classes), np.uint8)
    return table[mask]


def overlay(image: np.ndarray, mask: np.ndarray, num_classes: int, opacity: float = 0.5) -> np.ndarray:
    blend = (1 - opacity) * image.astype(np.float32) + opacity * colorize(mask, num_classes).astype(np.float32)
    return np.clip(blend + 0.5, 0, 255).astype(np.uint8)


def save_index_png(mask: np.ndarray, path: str, num_classes: int) -> None:
    """8-bit palette PNG for up to 256 classes (readers get the indices, viewers the colours); 16-bit otherwise."""
    if num_classes <= 256:
        img = Image.fromarray(mask.astype(np.uint8), mode="P")
        pal = np.zeros((256, 3), np.uint8)
        pal[:num_classes] = np.array(palette_for(num_classes), np.uint8)
        img.putpalette(pal.flatten().tolist())
    else:
        img = Image.fromarray(mask.astype(np.uint16))
    img.save(path)


def class_fractions(mask: np.ndarray, names: List[str]) -> Dict[str, float]:
    """Fraction of the pixels per predicted class, largest first (classes absent from the mask left out)."""
    counts = np.bincount(mask.ravel().astype(np.int64), minlength=len(names))
    order = np.argsort(-counts, kind="stable")
    total = max(int(mask.size), 1)
    return {names[i]: round(float(counts[i]) / total, 6) for i in order if counts[i] > 0}
