"""``overlock segment IMAGE_OR_DIR...``: per image, an index-PNG mask and a colour overlay (and ``--json``)."""
from __future__ import annotations

import argparse
import json
import os
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders (searched recursively)")
    p.add_argument("--checkpoint", required=True, metavar="FILE",
                   help="an official UperNet-OverLoCK file or a checkpoint of 'overlock train-seg'")
    p.add_argument("--model", default=None, help="overlock_{xt,t,s,b}; read from the checkpoint when omitted")
    p.add_argument("--output", "-o", default="segment-output", metavar="DIR",
                   help="where NAME_mask.png (class index per pixel, palette PNG) and NAME_overlay.png go")
    p.add_argument("--json", action="store_true", help="print per-image class pixel fractions as JSON")
    p.add_argument("--scale", type=int, nargs=2, default=[2048, 512], metavar=("LONG", "SHORT"),
                   help="keep-ratio test resize bound (official: 2048 512)")
    p.add_argument("--no-resize", action="store_true", help="segment at the image's own size (to a multiple of 32)")
    p.add_argument("--mode", choices=["whole", "slide"], default="whole",
                   help="whole image (official test mode) or sliding window for large images")
    p.add_argument("--crop-size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"), help="--mode slide")
    p.add_argument("--stride", type=int, nargs=2, default=[341, 341], metavar=("H", "W"), help="--mode slide")
    p.add_argument("--opacity", type=float, default=0.5, help="colour weight in the overlay")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")


def _images(inputs):
    from overlock.data.folder import IMG_EXTENSIONS

    for item in inputs:
        if os.path.isdir(item):
            for dirpath, _, files in sorted(os.walk(item)):
                for f in sorted(files):
                    if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith("."):
                        yield os.path.join(dirpath, f)
        elif os.path.isfile(item):
            yield item
        else:
            raise FileNotFoundError(f"{item}: no such image file or folder")


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image

    import overlock
    from overlock.cli import friendly_errors
    from overlock.segmentation.inference import infer, preprocess
    from overlock.segmentation.model import model_from_checkpoint
    from overlock.segmentation.visualize import class_fractions, overlay, save_index_png

    with friendly_errors("overlock segment"):
        paths = list(_images(args.inputs))
        if not paths:
            raise FileNotFoundError(f"no images found in {', '.join(args.inputs)}")
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if args.device == "auto" else args.device))
        model = overlock.fuse(model_from_checkpoint(args.checkpoint, args.model).eval()).to(device)  # fast form
        names = model.class_names
        os.makedirs(args.output, exist_ok=True)
        results, failed, used = [], 0, set()
        for path in paths:
            try:
                with open(path, "rb") as f:
                    image = np.asarray(Image.open(f).convert("RGB"))
            except Exception as e:  # noqa: BLE001 - reported per file, the others still run
                print(f"overlock segment: skipping unreadable image {path} ({e})", file=sys.stderr)
                failed += 1
                continue
            x = preprocess(image, None if args.no_resize else args.scale).to(device)
            with torch.no_grad():
                logits = infer(model, x, image.shape[:2], args.mode, tuple(args.crop_size), tuple(args.stride))
            mask = logits.argmax(1)[0].to(torch.uint8 if model.num_classes <= 256 else torch.int32).cpu().numpy()
            stem = os.path.splitext(os.path.basename(path))[0]
            while stem in used:  # same file name in two folders
                stem += "_"
            used.add(stem)
            mask_path = os.path.join(args.output, f"{stem}_mask.png")
            overlay_path = os.path.join(args.output, f"{stem}_overlay.png")
            save_index_png(mask, mask_path, model.num_classes)
            Image.fromarray(overlay(image, mask, model.num_classes, args.opacity)).save(overlay_path)
            results.append({"image": path, "mask": mask_path, "overlay": overlay_path,
                            "size": [int(image.shape[1]), int(image.shape[0])],
                            "classes": class_fractions(mask, names)})
        if args.json:
            print(json.dumps(results, indent=2))
        else:
            for r in results:
                top = ", ".join(f"{k} {100 * v:.1f}%" for k, v in list(r["classes"].items())[:5])
                print(f"{r['image']}: {top} -> {r['mask']}, {r['overlay']}")
    return 1 if failed and not results else 0
