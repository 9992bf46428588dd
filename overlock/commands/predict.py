"""``overlock predict IMAGE_OR_DIR...``: top-k labels with probabilities."""
from __future__ import annotations

import argparse
import json
import os

from .argtypes import positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    from overlock.training.modeling import add_weight_arguments

    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders (searched recursively)")
    p.add_argument("--topk", type=positive_int, default=5)
    p.add_argument("-b", "--batch-size", type=positive_int, default=32)
    p.add_argument("--json", action="store_true", help="print JSON (one object per image)")
    add_weight_arguments(p)


def _images(inputs):
    from overlock.data.folder import IMG_EXTENSIONS

    for item in inputs:
        if os.path.isdir(item):
            for dirpath, _, files in sorted(os.walk(item)):
                for f in sorted(files):
                    if f.lower().endswith(IMG_EXTENSIONS):
                        yield os.path.join(dirpath, f)
        elif os.path.isfile(item):
            yield item
        else:
            raise FileNotFoundError(f"{item}: no such image file or folder")


def class_names(names, num_classes: int):
    """Checkpoint class names; ImageNet descriptions (bundled with timm) for 1000-class models."""
    if names:
        return list(names)
    if num_classes == 1000:
        from timm.data import ImageNetInfo
        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(1000)]
    return [f"class_{i}" for i in range(num_classes)]


def run(args: argparse.Namespace) -> int:
    import sys

    import torch
    from PIL import Image

    import overlock  # noqa: F401
    from overlock.cli import friendly_errors
    from overlock.data.loaders import eval_transform
    from overlock.training.modeling import model_for_inference
    from overlock.training.run import autocast_for

    with friendly_errors("overlock predict"):
        paths = list(_images(args.inputs))
        if not paths:
            raise FileNotFoundError(f"no images found in {', '.join(args.inputs)}")
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if args.device == "auto" else args.device))
        model, names, cfg = model_for_inference(args, device)
        transform = eval_transform(cfg)
        autocast, _ = autocast_for(args, device)
        labels = class_names(names, model.num_classes)
        k = min(args.topk, len(labels))
        results, failed = [], 0
        for start in range(0, len(paths), args.batch_size):
            batch, ok = [], []
            for path in paths[start:start + args.batch_size]:
                try:
                    with open(path, "rb") as f:
                        batch.append(transform(Image.open(f).convert("RGB")))
                    ok.append(path)
                except Exception as e:  # noqa: BLE001 - reported per file, the others still run
                    print(f"overlock predict: skipping unreadable image {path} ({e})", file=sys.stderr)
                    failed += 1
            if not batch:
                continue
            x = torch.stack(batch).to(device)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad(), autocast():
                probs = model(x).float().softmax(dim=1)
            top = probs.topk(k, dim=1)
            for path, p, i in zip(ok, top.values.tolist(), top.indices.tolist()):
                results.append({"image": path, "top": [{"label": labels[j], "index": j, "prob": round(q, 6)}
                                                       for j, q in zip(i, p)]})
        if args.json:
            print(json.dumps(results, indent=2))
        else:
            for r in results:
                best = ", ".join(f"{t['label']} {100 * t['prob']:.1f}%" for t in r["top"])
                print(f"{r['image']}: {best}")
    return 1 if failed and not results else 0
