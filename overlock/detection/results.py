"""Detections as COCO results JSON and as annotated images."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = ["COCO_CATEGORY_IDS", "category_ids_for", "to_coco_results", "encode_mask", "draw_detections"]

# COCO 2017's category ids of the 80 classes, in the order of mmdet's (and the official checkpoints') labels
COCO_CATEGORY_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
                     31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
                     56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
                     85, 86, 87, 88, 89, 90)


def category_ids_for(class_names: Sequence[str], stored: Optional[Sequence[int]] = None) -> List[int]:
    """Category id of each label: stored with the checkpoint (training on COCO-format data), COCO's for the
    80 COCO classes, else label + 1."""
    if stored:
        return [int(c) for c in stored]
    from .build import COCO_CLASSES
    if tuple(class_names) == COCO_CLASSES:
        return list(COCO_CATEGORY_IDS)
    return list(range(1, len(class_names) + 1))


def encode_mask(mask: np.ndarray) -> dict:
    """COCO run-length encoding (pycocotools) of a bool HxW mask, JSON-ready."""
    from pycocotools import mask as mask_utils
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def to_coco_results(det: Dict[str, torch.Tensor], image_id: int, category_ids: Sequence[int],
                    with_masks: bool = True) -> List[dict]:
    """One image's detections in the COCO results format (``bbox`` as x, y, w, h)."""
    out = []
    boxes = det["boxes"].detach().cpu().double().tolist()
    scores = det["scores"].detach().cpu().tolist()
    labels = det["labels"].detach().cpu().tolist()
    masks = det["masks"].detach().cpu().numpy() if with_masks and "masks" in det else None
    for i, (b, s, l) in enumerate(zip(boxes, scores, labels)):
        r = {"image_id": image_id, "category_id": int(category_ids[l]),
             "bbox": [round(b[0], 3), round(b[1], 3), round(b[2] - b[0], 3), round(b[3] - b[1], 3)],
             "score": round(float(s), 5)}
        if masks is not None:
            r["segmentation"] = encode_mask(masks[i])
        out.append(r)
    return out


def _colour(i: int):
    rng = np.random.default_rng(i * 7919 + 17)
    return tuple(int(c) for c in rng.integers(60, 255, 3))


def draw_detections(image: Image.Image, det: Dict[str, torch.Tensor], class_names: Sequence[str],
                    score_thr: float = 0.3, alpha: float = 0.45) -> Image.Image:
    """Masks blended in, boxes outlined, ``name score`` labels; detections below ``score_thr`` left out."""
    img = np.asarray(image.convert("RGB")).astype(np.float32)
    keep = (det["scores"] >= score_thr).nonzero().flatten().tolist()
    masks = det.get("masks")
    for i in keep:
        if masks is not None:
            m = masks[i].cpu().numpy()
            img[m] = img[m] * (1 - alpha) + np.array(_colour(int(det["labels"][i])), np.float32) * alpha
    out = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for i in keep:
        label = int(det["labels"][i])
        x1, y1, x2, y2 = det["boxes"][i].tolist()
        colour = _colour(label)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
        name = class_names[label] if label < len(class_names) else str(label)
        text = f"{name} {float(det['scores'][i]):.2f}"
        tw = draw.textlength(text)
        ty = max(y1 - 12, 0)
        draw.rectangle([x1, ty, x1 + tw + 4, ty + 12], fill=colour)
        draw.text((x1 + 2, ty), text, fill=(0, 0, 0))
    return out
