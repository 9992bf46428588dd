"""Write generated scenes (image + instance masks) as a COCO-format split: PNG images and an instances JSON
with boxes, areas and RLE masks, as COCO's own files are laid out."""
from __future__ import annotations

import json
import os
from typing import Iterable, List, Sequence, Tuple

import numpy as np
from PIL import Image

__all__ = ["write_coco_split", "instance_annotation"]


def instance_annotation(mask: np.ndarray, category_id: int, image_id: int, ann_id: int) -> dict:
    """One COCO annotation from a bool mask: tight ``bbox`` (x, y, w, h), ``area`` (pixels), RLE
    ``segmentation``."""
    from pycocotools import mask as mask_utils
    ys, xs = np.nonzero(mask)
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    x1, y1, x2, y2 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": [x1, y1, x2 - x1, y2 - y1],
            "area": int(mask.sum()), "segmentation": rle, "iscrowd": 0}


def write_coco_split(root: str, split: str, scenes: Iterable[Tuple[np.ndarray, List[Tuple[int, np.ndarray]]]],
                     class_names: Sequence[str]) -> Tuple[str, str]:
    """Images to ``root/split/NNNNNN.png``, annotations to ``root/annotations/instances_split.json``;
    ``scenes`` yields ``(uint8 HxWx3 image, [(class index, bool HxW mask), ...])``. Returns (json, image dir)."""
    img_dir = os.path.join(root, split)
    ann_dir = os.path.join(root, "annotations")
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    images, annotations = [], []
    for image_id, (image, instances) in enumerate(scenes, start=1):
        name = f"{image_id:06d}.png"
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(os.path.join(img_dir, name))
        h, w = image.shape[:2]
        images.append({"id": image_id, "file_name": name, "height": int(h), "width": int(w)})
        for class_id, mask in instances:
            if mask.any():
                annotations.append(instance_annotation(mask, int(class_id) + 1, image_id, len(annotations) + 1))
    data = {"info": {"description": f"overlock generated scenes ({split})"}, "images": images,
            "annotations": annotations,
            "categories": [{"id": i + 1, "name": n, "supercategory": "object"} for i, n in enumerate(class_names)]}
    ann_path = os.path.join(ann_dir, f"instances_{split}.json")
    with open(ann_path, "w") as f:
        json.dump(data, f)
    return ann_path, img_dir
