"""ImageFolder data sets (``root/<split>/<class>/<image>``), checked before any compute.

Rule for unreadable images, so that a multi-day run never dies on one bad file:

- training split: an image that cannot be opened or decoded is *replaced* by the next readable image of the
  split (same augmentation seed), so every rank keeps full, equal batches; its path is logged once per worker
  and the replacement is counted;
- evaluation splits: the image is *skipped* (dropped from its batch) and counted, so metrics cover only
  readable images;
- more than ``max_consecutive_bad`` unreadable files in a row stop the run (the data set is broken, not noisy).
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import random
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

_logger = logging.getLogger("overlock")

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class DataError(ValueError):
    """A data set that cannot be used as given; the message names the path and says what to do."""


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def find_classes(split_dir: str) -> List[str]:
    """Sorted class folder names of one split (hidden folders ignored)."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _list_samples(split_dir: str, classes: Sequence[str]) -> Tuple[List[Tuple[str, int]], List[str]]:
    samples, empty = [], []
    for index, name in enumerate(classes):
        files = []
        for dirpath, _, filenames in os.walk(os.path.join(split_dir, name), followlinks=True):
            files.extend(os.path.join(dirpath, f) for f in filenames if _is_image(f))
        if not files:
            empty.append(name)
        samples.extend((path, index) for path in sorted(files))
    return samples, empty


_SPLIT_ALIASES = {"val": ("validation", "valid"), "validation": ("val", "valid")}


def resolve_split(root: str, split: str) -> str:
    """``split`` if it exists under ``root``, else a common alias (``val`` <-> ``validation``)."""
    if os.path.isdir(os.path.join(root, split)):
        return split
    return next((a for a in _SPLIT_ALIASES.get(split, ()) if os.path.isdir(os.path.join(root, a))), split)


def check_image_folder(root: str, splits: Sequence[str] = ("train", "val")) -> Dict[str, List[Tuple[str, int]]]:
    """Validate ``root`` as an ImageFolder with the given splits; return each split's (path, class) samples.

    Raises DataError naming the path for: a missing root or split, a split without class folders, an empty
    class, or splits whose class lists differ.
    """
    layout = f"expected {os.path.join(root, '<split>', '<class>', '<image>')}, e.g. train/ and val/ with one " \
             "folder per class"
    if not os.path.isdir(root):
        raise DataError(f"--data-dir {root}: no such directory ({layout})")
    classes_by_split, out = {}, {}
    for split in splits:
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            present = sorted(e.name for e in os.scandir(root) if e.is_dir())
            raise DataError(f"{split_dir}: missing '{split}' split ({layout}; found folders: "
                            f"{', '.join(present) or 'none'})")
        classes = find_classes(split_dir)
        if not classes:
            raise DataError(f"{split_dir}: no class folders ({layout})")
        samples, empty = _list_samples(split_dir, classes)
        if empty:
            raise DataError(f"{split_dir}: class folder(s) without images: {', '.join(empty[:10])}"
                            f"{' ...' if len(empty) > 10 else ''} (extensions {', '.join(IMG_EXTENSIONS)}); "
                            "add images or remove the folders")
        classes_by_split[split] = classes
        out[split] = samples
    first = splits[0]
    for split in splits[1:]:
        a, b = set(classes_by_split[first]), set(classes_by_split[split])
        if a != b:
            only_a, only_b = sorted(a - b), sorted(b - a)
            raise DataError(
                f"{root}: the class folders of '{first}' and '{split}' differ: only in {first}: "
                f"{', '.join(only_a[:10]) or '-'}; only in {split}: {', '.join(only_b[:10]) or '-'}. "
                "Both splits need the same class folders (an empty folder counts as missing)")
    return out


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A 32-bit seed for one sample of one epoch: augmentation independent of workers, ranks and resumes."""
    x = (seed * 0x9E3779B1 + epoch * 0x85EBCA77 + position * 0xC2B2AE3D) & 0xFFFFFFFFFFFF
    x ^= x >> 17
    return (x * 0x27D4EB2F) & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)


class ImageFolderSplit(torch.utils.data.Dataset):
    """One checked ImageFolder split with the unreadable-image rule of this module.

    Indexing with ``(index, seed)`` (what ``ResumableSampler`` yields) seeds Python, NumPy and torch before the
    transform, so a sample's augmentation depends only on the run seed, the epoch and its position.
    """

    def __init__(self, samples: Sequence[Tuple[str, int]], classes: Sequence[str], transform: Optional[Callable] = None,
                 replace_bad: bool = True, bad_log: Optional[str] = None, max_consecutive_bad: int = 100):
        self.samples = list(samples)
        self.classes = list(classes)
        self.transform = transform
        self.replace_bad = replace_bad
        self.bad_log = bad_log
        self.max_consecutive_bad = max_consecutive_bad
        self.bad_count = multiprocessing.Value("l", 0)  # shared with DataLoader workers
        self._logged: set = set()

    def __len__(self) -> int:
        return len(self.samples)

    def _report(self, path: str, err: Exception) -> None:
        with self.bad_count.get_lock():
            self.bad_count.value += 1
        if path in self._logged:
            return
        self._logged.add(path)
        action = "replaced by the next readable image" if self.replace_bad else "skipped"
        _logger.warning("unreadable image %s (%s: %s): %s", path, type(err).__name__, err, action)
        if self.bad_log:
            with open(self.bad_log, "a") as f:  # O_APPEND: whole short lines from concurrent workers
                f.write(f"{path}\t{type(err).__name__}: {err}\n")

    def _open(self, path: str) -> Image.Image:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")  # forces the decode inside the try of the caller

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        for attempt in range(self.max_consecutive_bad):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                img = self._open(path)
                break
            except Exception as e:  # noqa: BLE001 - any decode failure is handled by the documented rule
                self._report(path, e)
                if not self.replace_bad:
                    return None
        else:
            raise DataError(f"{self.max_consecutive_bad} unreadable images in a row from {path}: the data set "
                            "looks broken (wrong format or a failing disk), not merely noisy")
        if seed is not None:
            seed_everything(seed)
        if self.transform is not None:
            img = self.transform(img)
        return img, target


def collate_skipping_none(batch):
    """Default collation without the samples that the evaluation rule dropped (``None``)."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    return torch.utils.data.default_collate(batch)
