"""The handwritten digits that scikit-learn ships (1,797 real 8x8 scans, 10 classes) as an ImageFolder.

``python -m overlock.data.digits DIR`` writes ``DIR/train/<digit>/*.png`` and ``DIR/val/<digit>/*.png``
(a stratified 80/20 split, fixed seed): the demo's data set, needing no download.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image

from ..errors import UsageError


def write_digits(root: str, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Write the split; returns the number of images per split. Existing complete output is kept."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise UsageError("the digits demo needs scikit-learn: pip install scikit-learn") from e
    digits = load_digits()
    images, labels = digits.images, digits.target
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    for label in range(10):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        for split, part in (("val", idx[:n_val]), ("train", idx[n_val:])):
            folder = os.path.join(root, split, str(label))
            os.makedirs(folder, exist_ok=True)
            for i in part:
                pixels = (images[i] * (255.0 / 16.0)).round().astype(np.uint8)  # scans are 0..16
                path = os.path.join(folder, f"digit_{i:04d}.png")
                if not os.path.exists(path):
                    Image.fromarray(pixels, mode="L").save(path)
                counts[split] += 1
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", help="output directory")
    p.add_argument("--val-fraction", type=float, default=0.2)
    args = p.parse_args()
    counts = write_digits(args.root, args.val_fraction)
    print(f"wrote {counts['train']} training and {counts['val']} validation images to {args.root}")


if __name__ == "__main__":
    main()
