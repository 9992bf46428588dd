"""Demo data for Mask R-CNN: generated digit scenes (``overlock.data.scenes``) written as COCO-format splits.

``python -m overlock.detection.demo DIR`` writes ``DIR/annotations/instances_{train,val}.json`` and the images
in ``DIR/{train,val}/``: ten classes (the digits), boxes, areas and RLE masks, train and val from disjoint
random streams.
"""
from __future__ import annotations

import argparse

import numpy as np

from .coco_writer import write_coco_split

CLASSES = [str(d) for d in range(10)]


def write_demo_dataset(root: str, n_train: int = 400, n_val: int = 50, size: int = 64, seed: int = 0):
    from ..data.scenes import make_scene
    paths = {}
    for split, n, stream in (("train", n_train, 0), ("val", n_val, 1)):
        rng = np.random.default_rng([seed, stream, 7])
        paths[split] = write_coco_split(root, split, (make_scene(rng, size) for _ in range(n)), CLASSES)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write generated digit scenes as COCO-format instance data.")
    p.add_argument("root")
    p.add_argument("--train", type=int, default=400)
    p.add_argument("--val", type=int, default=50)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    paths = write_demo_dataset(a.root, a.train, a.val, a.size, a.seed)
    for split, (ann, images) in paths.items():
        print(f"{split}: {ann} ({images})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
