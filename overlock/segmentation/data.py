"""Segmentation data: the ADE20K layout and a plain layout for your own masks, with mmseg's training pipeline.

Layouts (checked before any compute, errors name the path):

- ADE20K (``ADEChallengeData2016``): ``images/{training,validation}/*.jpg`` and
  ``annotations/{training,validation}/*.png``; 150 classes, ``reduce_zero_label`` (annotation 0, "other",
  is ignored; value v becomes class v - 1).
- Plain: ``images/{train,val}/*`` and ``masks/{train,val}/*.png`` (or ``annotations/``), plus ``classes.txt``
  (one class name per line); mask value = class index, 255 = ignore.

Mask rule, so a long run never dies on one file: an image without a mask is named and left out when the split is
listed; a mask that cannot be read, has another size than its image, or holds values that are neither a class
nor 255 is named, logged to ``RUN/bad_images.txt`` and replaced by the next good sample (training) or skipped
(evaluation).

Training pipeline (mmseg 0.30's, in this order): keep-ratio resize to ``scale`` (2048, 512) times a random
ratio in [0.5, 2.0]; random 512x512 crop, re-drawn up to 10 times until no class covers more than 75% of it;
horizontal flip with p = 0.5; photometric distortion (brightness +-32, contrast and saturation x[0.5, 1.5], hue
+-18 of 180, each with p = 0.5, contrast first or last at random); normalise; pad to the crop size (image 0,
mask 255). Random choices come from a generator seeded per sample, so runs resume exactly.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.folder import IMG_EXTENSIONS, DataError
from .ade20k import ADE20K_CLASSES
from .inference import normalize, preprocess, rescale_size

_logger = logging.getLogger("overlock")

__all__ = ["SegLayout", "find_layout", "SegDataset", "TrainPipeline", "photometric_distortion", "BadMask"]

SPLIT_NAMES = {"train": ("training", "train"), "val": ("validation", "val", "valid")}


class BadMask(ValueError):
    """A mask that cannot be used (unreadable, wrong size, values outside the classes)."""


class SegLayout:
    """A checked data set root: class names, ``reduce_zero_label`` and (image, mask) pairs per split."""

    def __init__(self, root: str, classes: List[str], reduce_zero_label: bool, kind: str,
                 splits: Dict[str, List[Tuple[str, str]]], missing: Dict[str, List[str]]):
        self.root, self.classes, self.reduce_zero_label, self.kind = root, classes, reduce_zero_label, kind
        self.splits, self.missing = splits, missing


def _split_dir(root: str, parent: str, split: str) -> Optional[str]:
    for name in (split, *SPLIT_NAMES.get(split, ())):
        path = os.path.join(root, parent, name)
        if os.path.isdir(path):
            return path
    return None


def find_layout(root: str, splits: Sequence[str] = ("train", "val"), reduce_zero_label: Optional[bool] = None
                ) -> SegLayout:
    layouts = ("expected ADE20K's images/{training,validation} + annotations/{training,validation}, or "
               "images/{train,val} + masks/{train,val} + classes.txt")
    if not os.path.isdir(root):
        raise DataError(f"--data-dir {root}: no such directory ({layouts})")
    classes_file = os.path.join(root, "classes.txt")
    if os.path.isfile(classes_file):
        with open(classes_file) as f:
            classes = [line.strip() for line in f if line.strip()]
        if not classes:
            raise DataError(f"{classes_file}: no class names (one per line)")
        if len(classes) > 255:
            raise DataError(f"{classes_file}: {len(classes)} classes; masks are 8-bit with 255 = ignore, so at most 255")
        kind, default_rzl = "plain", False
    else:
        classes, kind, default_rzl = list(ADE20K_CLASSES), "ade20k", True
    rzl = default_rzl if reduce_zero_label is None else reduce_zero_label
    out, missing = {}, {}
    for split in splits:
        img_dir = _split_dir(root, "images", split)
        ann_dir = _split_dir(root, "annotations", split) or _split_dir(root, "masks", split)
        if img_dir is None or ann_dir is None:
            what = "images" if img_dir is None else "annotations (or masks)"
            raise DataError(f"{root}: no {what} folder for the '{split}' split ({layouts})")
        masks = {os.path.splitext(f)[0]: os.path.join(ann_dir, f) for f in os.listdir(ann_dir)
                 if f.lower().endswith(".png") and not f.startswith(".")}
        pairs, lost = [], []
        for f in sorted(os.listdir(img_dir)):
            if f.startswith(".") or not f.lower().endswith(IMG_EXTENSIONS):
                continue
            stem = os.path.splitext(f)[0]
            if stem in masks:
                pairs.append((os.path.join(img_dir, f), masks[stem]))
            else:
                lost.append(os.path.join(img_dir, f))
        if lost:
            _logger.warning("%d image(s) in %s have no mask in %s and are left out: %s%s", len(lost), img_dir,
                            ann_dir, ", ".join(os.path.basename(p) for p in lost[:5]), " ..." if len(lost) > 5 else "")
        if not pairs:
            raise DataError(f"{img_dir}: no image with a mask of the same name in {ann_dir} (mask = <image name>.png)")
        out[split], missing[split] = pairs, lost
    return SegLayout(root, classes, rzl, kind, out, missing)


def load_pair(image_path: str, mask_path: str, num_classes: int, reduce_zero_label: bool
              ) -> Tuple[np.ndarray, np.ndarray]:
    """RGB uint8 image and uint8 label map (class indices, 255 = ignore); BadMask names what is wrong."""
    with open(image_path, "rb") as f:
        image = np.asarray(Image.open(f).convert("RGB"))
    try:
        with open(mask_path, "rb") as f:
            m = Image.open(f)
            m.load()
    except Exception as e:  # noqa: BLE001 - any decode failure
        raise BadMask(f"unreadable mask {mask_path} ({type(e).__name__}: {e})") from e
    if m.mode not in ("L", "P", "I", "I;16"):
        raise BadMask(f"{mask_path}: mode {m.mode}; expected a single-channel index PNG (mode L or P)")
    label = np.asarray(m).astype(np.int64)
    if label.shape != image.shape[:2]:
        raise BadMask(f"{mask_path}: size {label.shape[1]}x{label.shape[0]} differs from its image "
                      f"{image_path} ({image.shape[1]}x{image.shape[0]})")
    if reduce_zero_label:
        label = np.where(label == 0, 255, label - 1)
        label[label == 254] = 255
    bad = (label >= num_classes) & (label != 255)
    if bad.any():
        raise BadMask(f"{mask_path}: values {sorted(set(np.unique(label[bad]).tolist()))[:5]} are neither a class "
                      f"index (0..{num_classes - 1}) nor 255 (ignore)")
    return image, label.astype(np.uint8)


def _hsv(rgb: np.ndarray) -> np.ndarray:
    """float RGB in [0, 255] -> H in [0, 180), S and V in [0, 255] (OpenCV's 8-bit HSV ranges)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(-1)
    c = v - rgb.min(-1)
    s = np.where(v > 0, 255.0 * c / np.maximum(v, 1e-12), 0.0)
    safe = np.maximum(c, 1e-12)
    h = np.where(v == r, (g - b) / safe, np.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = np.where(c > 0, (h * 30.0) % 180.0, 0.0)
    return np.stack([h, s, v], -1)


def _rgb(hsv: np.ndarray) -> np.ndarray:
    h, s, v = hsv[..., 0] / 30.0, hsv[..., 1] / 255.0, hsv[..., 2]
    i = np.floor(h).astype(np.int64) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros(hsv.shape, np.float64)
    for k, (rr, gg, bb) in enumerate(table):
        sel = i == k
        out[sel] = np.stack([rr[sel], gg[sel], bb[sel]], -1)
    return out


def photometric_distortion(img: np.ndarray, rng: np.random.Generator, brightness: int = 32,
                           contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue: int = 18) -> np.ndarray:
    """mmseg ``PhotoMetricDistortion`` on a uint8 RGB image (values clipped and rounded down to uint8 after each
    step, as mmseg does)."""
    def conv(x, alpha=1.0, beta=0.0):
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    if rng.integers(2):
        img = conv(img, beta=rng.uniform(-brightness, brightness))
    contrast_first = rng.integers(2)
    if contrast_first and rng.integers(2):
        img = conv(img, alpha=rng.uniform(*contrast))
    if rng.integers(2):
        hsv = _hsv(img.astype(np.float64))
        hsv[..., 1] = conv(hsv[..., 1], alpha=rng.uniform(*saturation))
        img = np.clip(np.round(_rgb(hsv)), 0, 255).astype(np.uint8)
    if rng.integers(2):
        hsv = _hsv(img.astype(np.float64))
        hsv[..., 0] = (np.floor(hsv[..., 0]) + rng.integers(-hue, hue)) % 180
        img = np.clip(np.round(_rgb(hsv)), 0, 255).astype(np.uint8)
    if not contrast_first and rng.integers(2):
        img = conv(img, alpha=rng.uniform(*contrast))
    return img


def _resize(img: np.ndarray, size: Tuple[int, int], mode: str) -> np.ndarray:
    """(H, W[, C]) uint8 -> ``size`` = (h, w); bilinear rounds like OpenCV, nearest picks floor(x * scale).

    Bilinear is computed in NumPy (float64, separable, ``align_corners=False`` like ``F.interpolate``): torch's
    CPU kernel rounds some pixels differently with 1 and with 2+ threads, and data workers run single-threaded,
    so the crops (and a resumed run) would depend on ``--workers``."""
    if img.shape[:2] == tuple(size):
        return img
    if mode == "nearest":
        t = torch.from_numpy(np.array(img, dtype=np.float32))
        t = t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]
        t = F.interpolate(t, size=size, mode=mode)
        t = t[0, 0] if img.ndim == 2 else t[0].permute(1, 2, 0)
        return t.numpy().astype(np.uint8)
    x = img.astype(np.float64)
    for axis, n_out in enumerate(size):
        i0, i1, w = _linear_taps(img.shape[axis], n_out)
        shape = [1] * x.ndim
        shape[axis] = n_out
        w = w.reshape(shape)
        x = np.take(x, i0, axis=axis) * (1 - w) + np.take(x, i1, axis=axis) * w
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _linear_taps(n_in: int, n_out: int):
    """Source indices and weights of 1-D linear interpolation, as ``F.interpolate(align_corners=False)``."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    return i0, np.minimum(i0 + 1, n_in - 1), src - i0


class TrainPipeline:
    """The official training augmentation; ``__call__(image, label, rng)`` -> (normalised CHW tensor, label)."""

    def __init__(self, crop_size=(512, 512), scale=(2048, 512), ratio_range=(0.5, 2.0), cat_max_ratio: float = 0.75,
                 flip: float = 0.5, photometric: bool = True, ignore_index: int = 255):
        self.crop_size, self.scale, self.ratio_range = tuple(crop_size), tuple(scale), tuple(ratio_range)
        self.cat_max_ratio, self.flip, self.photometric = cat_max_ratio, flip, photometric
        self.ignore_index = ignore_index

    def _crop_box(self, label: np.ndarray, rng: np.random.Generator):
        ch, cw = self.crop_size
        mh, mw = max(label.shape[0] - ch, 0), max(label.shape[1] - cw, 0)
        y, x = int(rng.integers(0, mh + 1)), int(rng.integers(0, mw + 1))
        return y, min(y + ch, label.shape[0]), x, min(x + cw, label.shape[1])

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        ratio = rng.uniform(*self.ratio_range)
        target = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        h, w = image.shape[:2]
        nw, nh = rescale_size(w, h, target)
        image, label = _resize(image, (nh, nw), "bilinear"), _resize(label, (nh, nw), "nearest")
        box = self._crop_box(label, rng)
        if self.cat_max_ratio < 1:
            for _ in range(10):
                crop = label[box[0]:box[1], box[2]:box[3]]
                values, counts = np.unique(crop, return_counts=True)
                counts = counts[values != self.ignore_index]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                box = self._crop_box(label, rng)
        image, label = image[box[0]:box[1], box[2]:box[3]], label[box[0]:box[1], box[2]:box[3]]
        if rng.random() < self.flip:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric:
            image = photometric_distortion(np.ascontiguousarray(image), rng)
        x = normalize(torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None])[0]
        ch, cw = self.crop_size
        pad_h, pad_w = ch - x.shape[1], cw - x.shape[2]
        y = torch.from_numpy(np.array(label, dtype=np.int64))
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, (0, max(pad_w, 0), 0, max(pad_h, 0)), value=0.0)
            y = F.pad(y, (0, max(pad_w, 0), 0, max(pad_h, 0)), value=self.ignore_index)
        return x, y


class SegDataset(torch.utils.data.Dataset):
    """(image, mask) pairs with the mask rule of this module.

    Training (``pipeline`` given): indexed with ``(index, seed)`` from ``ResumableSampler``; returns the
    augmented ``(image, label)`` crop. Evaluation: returns the test-preprocessed image (batch of one), the label
    at the original size and the image path, or None for a skipped sample.
    """

    def __init__(self, pairs: Sequence[Tuple[str, str]], num_classes: int, reduce_zero_label: bool,
                 pipeline: Optional[TrainPipeline] = None, test_scale=(2048, 512), bad_log: Optional[str] = None,
                 max_consecutive_bad: int = 100):
        self.pairs, self.num_classes, self.reduce_zero_label = list(pairs), num_classes, reduce_zero_label
        self.pipeline, self.test_scale, self.bad_log = pipeline, test_scale, bad_log
        self.max_consecutive_bad = max_consecutive_bad
        self.bad_count = multiprocessing.Value("l", 0)
        self._logged: set = set()

    def __len__(self) -> int:
        return len(self.pairs)

    def _report(self, path: str, err: Exception) -> None:
        with self.bad_count.get_lock():
            self.bad_count.value += 1
        if path in self._logged:
            return
        self._logged.add(path)
        action = "replaced by the next sample" if self.pipeline is not None else "skipped"
        _logger.warning("bad sample %s (%s): %s", path, err, action)
        if self.bad_log:
            with open(self.bad_log, "a") as f:
                f.write(f"{path}\t{type(err).__name__}: {err}\n")

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        for attempt in range(self.max_consecutive_bad):
            image_path, mask_path = self.pairs[(index + attempt) % len(self.pairs)]
            try:
                image, label = load_pair(image_path, mask_path, self.num_classes, self.reduce_zero_label)
                break
            except Exception as e:  # noqa: BLE001 - unreadable image or bad mask: the documented rule
                self._report(image_path if not isinstance(e, BadMask) else mask_path, e)
                if self.pipeline is None:
                    return None
        else:
            raise DataError(f"{self.max_consecutive_bad} bad samples in a row up to {image_path}: the data set looks "
                            "broken, not merely noisy")
        if self.pipeline is not None:
            rng = np.random.default_rng(seed if seed is not None else index)
            return self.pipeline(image, label, rng)
        x = preprocess(image, self.test_scale)[0]
        return x, torch.from_numpy(label.astype(np.int64)), image_path


def collate_eval(batch):
    """Evaluation batches hold one image (sizes differ); None when it was skipped."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    (x, y, path), = batch
    return x[None], y[None], path
