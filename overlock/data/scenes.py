"""Generated scenes for dense-prediction demos and tests: scikit-learn digit scans pasted onto scikit-image textures.

``make_scene(rng, size)`` returns ``(image, instances)``: an ``size x size x 3`` uint8 RGB image and a list of
``(class_id, mask)`` with ``class_id`` the digit (0-9) and ``mask`` a boolean ``size x size`` array of its pixels.
(Keyword-only arguments tune the number and size of digits; the defaults are the demo's.)
Backgrounds are random crops of scikit-image's bundled textures (brick, grass, gravel, moon, camera), tinted with a
random colour and darkened; each digit is one of scikit-learn's 1,797 8x8 scans, enlarged (bilinear), painted in
a random bright colour with the scan's grey levels as opacity, its mask the pixels above a quarter of full ink. Digits never overlap (each pixel has at most one
instance), so the same scenes serve semantic segmentation (``semantic_label``) and instance detection.

Everything is drawn from ``rng`` (a ``numpy.random.Generator``): the same generator state gives the same scene.
Needs ``scikit-learn`` and ``scikit-image`` (``pip install 'overlock[demo]'``).

Command line: ``python -m overlock.data.scenes DIR`` writes a segmentation data set in the plain layout of
``overlock train-seg`` (``images/{train,val}``, ``masks/{train,val}`` with 0 = background, digit d = d + 1,
and ``classes.txt``).
"""
from __future__ import annotations

import argparse
import functools
import os
from typing import List, Tuple

import numpy as np

__all__ = ["make_scene", "semantic_label", "SEMANTIC_CLASSES", "write_segmentation_dataset"]

TEXTURES = ("brick", "grass", "gravel", "moon", "camera")
SEMANTIC_CLASSES = ["background"] + [str(d) for d in range(10)]


@functools.lru_cache(maxsize=1)
def _digits() -> Tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _textures() -> List[np.ndarray]:
    import skimage.data
    return [getattr(skimage.data, name)().astype(np.float32) / 255.0 for name in TEXTURES]


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of a 2-D float array (half-pixel centres), numpy only."""
    ys = np.clip((np.arange(h) + 0.5) * img.shape[0] / h - 0.5, 0, img.shape[0] - 1)
    xs = np.clip((np.arange(w) + 0.5) * img.shape[1] / w - 0.5, 0, img.shape[1] - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, img.shape[0] - 1), np.minimum(x0 + 1, img.shape[1] - 1)
    wy, wx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = img[y0][:, x0] * (1 - wx) + img[y0][:, x1] * wx
    bottom = img[y1][:, x0] * (1 - wx) + img[y1][:, x1] * wx
    return top * (1 - wy) + bottom * wy


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    tex = _textures()[int(rng.integers(len(TEXTURES)))]
    side = int(rng.integers(max(size, 64), min(tex.shape) + 1))
    y, x = (int(rng.integers(0, tex.shape[i] - side + 1)) for i in (0, 1))
    gray = _resize(tex[y:y + side, x:x + side], size, size)
    tint = rng.uniform(0.3, 1.0, 3)
    return gray[..., None] * tint[None, None, :] * (0.4 * 255.0)  # darkened: the bright digits stand out


def make_scene(rng: np.random.Generator, size: int, *, max_digits: int = 3, min_side: float = 0.3,
               max_side: float = 0.6, min_digits: int = 1) -> Tuple[np.ndarray, List[Tuple[int, np.ndarray]]]:
    """One scene: ``(image uint8 HxWx3, [(class_id, mask bool HxW), ...])`` with H = W = ``size``; ``min_digits``
    to ``max_digits`` digits of ``min_side`` to ``max_side`` x ``size`` pixels (fewer when they do not fit without
    overlapping). Large, bold digits by default, so that a network whose output has stride 4 can resolve them."""
    if size < 16:
        raise ValueError(f"make_scene: size must be at least 16 pixels, got {size}")
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"make_scene: need 1 <= min_digits <= max_digits, got {min_digits} and {max_digits}")
    if not 0 < min_side <= max_side <= 1:
        raise ValueError(f"make_scene: need 0 < min_side <= max_side <= 1 (fractions of size), got {min_side} and "
                         f"{max_side}")
    images, targets = _digits()
    canvas = _background(rng, size)
    occupied = np.zeros((size, size), bool)
    instances: List[Tuple[int, np.ndarray]] = []
    for _ in range(int(rng.integers(min_digits, max_digits + 1))):
        k = int(rng.integers(len(images)))
        side = int(rng.integers(max(8, int(size * min_side)), max(9, int(size * max_side)) + 1))
        for _attempt in range(10):
            y, x = (int(rng.integers(0, size - side + 1)) for _ in range(2))
            if not occupied[max(y - 1, 0):y + side + 1, max(x - 1, 0):x + side + 1].any():
                break
        else:
            continue
        glyph = _resize(images[k], side, side)
        local = glyph > 0.25
        if local.sum() < 4:
            continue
        mask = np.zeros((size, size), bool)
        mask[y:y + side, x:x + side] = local
        # the scan's grey levels as the paint's opacity: strokes keep the scan's inner detail, which a thresholded
        # silhouette loses (a from-scratch network then barely learns which digit it is)
        alpha = glyph[..., None]
        colour = rng.uniform(180, 255, 3)
        region = canvas[y:y + side, x:x + side]
        canvas[y:y + side, x:x + side] = region * (1 - alpha) + colour[None, None, :] * alpha
        occupied[y:y + side, x:x + side] = True
        instances.append((int(targets[k]), mask))
    noise = rng.normal(0, 6.0, canvas.shape)
    return np.clip(canvas + noise + 0.5, 0, 255).astype(np.uint8), instances


def semantic_label(instances: List[Tuple[int, np.ndarray]], size: int) -> np.ndarray:
    """uint8 label map for the segmentation layout: 0 = background, digit d = d + 1."""
    label = np.zeros((size, size), np.uint8)
    for class_id, mask in instances:
        label[mask] = class_id + 1
    return label


def write_segmentation_dataset(root: str, n_train: int = 600, n_val: int = 100, size: int = 64, seed: int = 0,
                               **scene_kwargs) -> str:
    """Write generated scenes in the plain segmentation layout; train and val use disjoint random streams.
    ``scene_kwargs`` go to :func:`make_scene` (number and size of the digits)."""
    from PIL import Image

    for split, n, stream in (("train", n_train, 0), ("val", n_val, 1)):
        rng = np.random.default_rng([seed, stream])
        os.makedirs(os.path.join(root, "images", split), exist_ok=True)
        os.makedirs(os.path.join(root, "masks", split), exist_ok=True)
        for i in range(n):
            image, instances = make_scene(rng, size, **scene_kwargs)
            Image.fromarray(image).save(os.path.join(root, "images", split, f"scene_{i:05d}.png"))
            Image.fromarray(semantic_label(instances, size)).save(os.path.join(root, "masks", split,
                                                                               f"scene_{i:05d}.png"))
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("\n".join(SEMANTIC_CLASSES) + "\n")
    return root


def add_scene_arguments(p: argparse.ArgumentParser) -> None:
    """The :func:`make_scene` options as command-line flags (shared with the detection demo's writer)."""
    p.add_argument("--min-digits", type=int, default=1, help="fewest digits per scene")
    p.add_argument("--max-digits", type=int, default=3, help="most digits per scene (fewer when they do not fit)")
    p.add_argument("--min-side", type=float, default=0.3, help="smallest digit side, as a fraction of --size")
    p.add_argument("--max-side", type=float, default=0.6, help="largest digit side, as a fraction of --size")


def scene_kwargs(args: argparse.Namespace) -> dict:
    return dict(min_digits=args.min_digits, max_digits=args.max_digits, min_side=args.min_side,
                max_side=args.max_side)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write generated digit scenes as a segmentation data set.")
    p.add_argument("root")
    p.add_argument("--train", type=int, default=600)
    p.add_argument("--val", type=int, default=100)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    add_scene_arguments(p)
    a = p.parse_args(argv)
    write_segmentation_dataset(a.root, a.train, a.val, a.size, a.seed, **scene_kwargs(a))
    print(f"{a.train} training and {a.val} validation scenes ({a.size}x{a.size}) in {a.root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
