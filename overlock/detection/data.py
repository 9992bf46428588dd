"""COCO-format instance data (instances JSON + image folder) for Mask R-CNN training and evaluation.

Annotations are read with pycocotools and filtered by mmdetection's ``CocoDataset`` rules, so a data set that
COCO tools accept trains here and nothing in it crashes a run:

- boxes with no overlap with the image, zero area, or width/height below 1 pixel are dropped;
- crowd regions (``iscrowd=1``) and ``ignore`` annotations are not training targets (COCO evaluation uses them);
- annotations of unknown categories are dropped;
- images without usable objects, and images whose files are missing or unreadable, are left out of training
  (kept, missing ones excepted, for evaluation);
- a missing or malformed segmentation falls back to the filled box.

Every dropped item is counted and named in the data set's ``report`` (and ``bad_annotations.txt`` of a run).
"""
from __future__ import annotations

import os
from collections import Counter
from typing import List

import numpy as np
import torch
from PIL import Image

from ..data.folder import DataError

__all__ = ["CocoInstances", "collate", "DataError"]


def _coco(ann_file: str):
    try:
        from pycocotools.coco import COCO
    except ImportError as e:
        raise DataError("COCO-format data needs pycocotools: pip install 'overlock[detection]'") from e
    if not os.path.isfile(ann_file):
        raise DataError(f"{ann_file}: annotation file not found (a COCO instances JSON)")
    import contextlib
    import io
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(ann_file)
    except Exception as e:  # noqa: BLE001 - any parse error is the file's
        raise DataError(f"{ann_file}: not a readable COCO instances JSON ({e})") from e


class CocoInstances(torch.utils.data.Dataset):
    """Items are ``(image uint8 3xHxW, target)``; the target holds ``boxes`` (x1, y1, x2, y2), ``labels``
    (1-based, torchvision's convention; label ``k`` is ``class_names[k - 1]``), ``masks`` (uint8 N x H x W)
    and ``image_id``. ``train=True`` keeps only images with objects and flips with probability ``flip``
    (seeded per sample when indexed with ``(index, seed)``)."""

    def __init__(self, ann_file: str, img_dir: str, train: bool = False, flip: float = 0.5, min_size: int = 32):
        self.coco = _coco(ann_file)
        self.ann_file, self.img_dir, self.train, self.flip = ann_file, img_dir, train, flip
        if not os.path.isdir(img_dir):
            raise DataError(f"{img_dir}: image folder not found (the images of {ann_file})")
        self.cat_ids = sorted(self.coco.getCatIds())
        if not self.cat_ids:
            raise DataError(f"{ann_file}: no categories")
        self.cat_to_label = {c: i for i, c in enumerate(self.cat_ids)}
        self.class_names = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self.report: Counter = Counter()
        self.problems: List[str] = []
        self.ids = []
        for img_id in sorted(self.coco.getImgIds()):
            info = self.coco.imgs[img_id]
            path = os.path.join(img_dir, info["file_name"])
            if not os.path.isfile(path):
                self._note("missing image file", f"{path} (image id {img_id})")
                continue
            if train:
                if min(info.get("width", min_size), info.get("height", min_size)) < min_size:
                    self._note("image smaller than 32 pixels (skipped for training)", f"image id {img_id}")
                    continue
                if not self._annotations(img_id, info, note=False)[0]:
                    self._note("image without objects (skipped for training)", f"image id {img_id}")
                    continue
            self.ids.append(img_id)
        if train:
            for img_id in self.ids:
                self._annotations(img_id, self.coco.imgs[img_id], note=True)
        if not self.ids:
            raise DataError(f"{ann_file}: no usable images in {img_dir} ({self.summary() or 'no images listed'})")

    def _note(self, kind: str, detail: str) -> None:
        self.report[kind] += 1
        self.problems.append(f"{kind}: {detail}")

    def summary(self) -> str:
        return ", ".join(f"{n} {kind}" for kind, n in sorted(self.report.items()))

    def _annotations(self, img_id: int, info: dict, note: bool):
        """Usable annotations of one image (mmdet ``_parse_ann_info``)."""
        w_img, h_img = info.get("width"), info.get("height")
        keep = []
        for ann in self.coco.imgToAnns.get(img_id, []):
            problem = None
            bbox = ann.get("bbox")
            if ann.get("ignore", False):
                problem = "ignored annotation"
            elif not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
                problem = "annotation without a 4-number bbox"
            elif ann.get("category_id") not in self.cat_to_label:
                problem = "annotation of an unknown category"
            else:
                x1, y1, w, h = (float(v) for v in bbox)
                inter_w = max(0.0, min(x1 + w, w_img if w_img else x1 + w) - max(x1, 0.0))
                inter_h = max(0.0, min(y1 + h, h_img if h_img else y1 + h) - max(y1, 0.0))
                if inter_w * inter_h == 0:
                    problem = "box outside the image"
                elif ann.get("area", w * h) <= 0 or w < 1 or h < 1:
                    problem = "zero-area or sub-pixel box"
                elif ann.get("iscrowd", 0):
                    problem = "crowd region (not a training target)"
            if problem:
                if note:
                    self._note(problem, f"annotation id {ann.get('id')} of image id {img_id}")
                continue
            keep.append(ann)
        return keep, (w_img, h_img)

    def __len__(self) -> int:
        return len(self.ids)

    def _mask(self, ann: dict, h: int, w: int) -> np.ndarray:
        seg = ann.get("segmentation")
        if seg:
            try:
                if isinstance(seg, list):
                    seg = [p for p in seg if len(p) >= 6 and len(p) % 2 == 0]
                    if not seg:
                        raise ValueError("no polygon with 3 or more points")
                from pycocotools import mask as mask_utils
                if isinstance(seg, list):
                    rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
                elif isinstance(seg.get("counts"), list):
                    rle = mask_utils.frPyObjects(seg, h, w)
                else:
                    rle = seg
                m = mask_utils.decode(rle)
                if m.shape == (h, w):
                    return m
            except Exception:  # noqa: BLE001 - malformed segmentation: fall back to the box
                pass
        self._note("missing or malformed segmentation (box used)", f"annotation id {ann.get('id')}")
        m = np.zeros((h, w), np.uint8)
        x1, y1, bw, bh = ann["bbox"]
        m[max(int(y1), 0):max(int(np.ceil(y1 + bh)), 0), max(int(x1), 0):max(int(np.ceil(x1 + bw)), 0)] = 1
        return m

    def load_image(self, index: int) -> Image.Image:
        info = self.coco.imgs[self.ids[index]]
        with open(os.path.join(self.img_dir, info["file_name"]), "rb") as f:
            return Image.open(f).convert("RGB")

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        img_id = self.ids[index]
        info = self.coco.imgs[img_id]
        try:
            image = self.load_image(index)
        except Exception as e:  # noqa: BLE001 - an unreadable file: named, the run goes on
            self._note("unreadable image", f"{info['file_name']} ({e})")
            return None
        w, h = image.size
        anns, _ = self._annotations(img_id, dict(info, width=w, height=h), note=False)
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self.cat_to_label[a["category_id"]] + 1 for a in anns], dtype=torch.int64)
        masks = torch.from_numpy(np.stack([self._mask(a, h, w) for a in anns])) if anns else \
            torch.zeros(0, h, w, dtype=torch.uint8)
        x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        if self.train and self.flip > 0:
            rng = np.random.default_rng(seed)
            if rng.random() < self.flip:
                x, masks = x.flip(-1), masks.flip(-1)
                boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
        return x, {"boxes": boxes, "labels": labels, "masks": masks, "image_id": img_id}


def collate(batch):
    """Lists of images and targets; unreadable images (``None``) are dropped."""
    batch = [b for b in batch if b is not None]
    return [b[0] for b in batch], [b[1] for b in batch]
