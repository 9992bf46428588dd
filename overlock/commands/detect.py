"""``overlock detect IMAGE_OR_DIR... --checkpoint FILE``: boxes and masks, as annotated PNGs and COCO results."""
from __future__ import annotations

import argparse
import json
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders (searched recursively)")
    p.add_argument("--checkpoint", required=True, metavar="FILE",
                   help="official mmdet Mask R-CNN file (mask_rcnn_overlock_*_coco.pth) or one from overlock "
                        "detection training")
    p.add_argument("--model", default=None, help="overlock_{xt,t,s,b}; default: read from the checkpoint")
    p.add_argument("--score-thr", type=float, default=0.3,
                   help="lowest score drawn and written to the results JSON (the model keeps scores > 0.05)")
    p.add_argument("--output", default="detections", metavar="DIR",
                   help="folder for the annotated PNGs and results.json")
    p.add_argument("--img-scale", type=int, nargs=2, default=None, metavar=("LONG", "SHORT"),
                   help="keep-ratio resize limit (default: the checkpoint's, else mmdet's 1333 800)")
    p.add_argument("--no-images", action="store_true", help="write results.json only")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")


def _image_id(path: str, index: int) -> int:
    """COCO file names are their image ids (000000397133.jpg); other files are numbered in order."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return int(stem) if stem.isdigit() else index


def run(args: argparse.Namespace) -> int:
    import overlock
    import sys

    import numpy as np
    import torch
    from PIL import Image

    from overlock.cli import friendly_errors
    from overlock.commands.predict import _images
    from overlock.detection.build import create_detection_model, infer_variant
    from overlock.detection.results import category_ids_for, draw_detections, to_coco_results
    from overlock.weights import read_checkpoint

    torch.set_flush_denormal(True)  # as for train/predict: denormals slow CPU kernels, change nothing measurable
    with friendly_errors("overlock detect"):
        paths = list(_images(args.inputs))
        if not paths:
            raise FileNotFoundError(f"no images found in {', '.join(args.inputs)}")
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if args.device == "auto" else args.device))
        obj = read_checkpoint(args.checkpoint)
        name = args.model or infer_variant(obj)
        scale = (max(args.img_scale), min(args.img_scale)) if args.img_scale else None
        model = overlock.fuse(create_detection_model(name, checkpoint=obj, test_scale=scale).eval()).to(device)
        category_ids = category_ids_for(model.class_names, obj.get("category_ids") if isinstance(obj, dict) else None)
        os.makedirs(args.output, exist_ok=True)
        results, failed, used_ids = [], 0, {}
        for index, path in enumerate(paths):
            try:
                with open(path, "rb") as f:
                    image = Image.open(f).convert("RGB")
            except Exception as e:  # noqa: BLE001 - reported per file, the others still run
                print(f"overlock detect: skipping unreadable image {path} ({e})", file=sys.stderr)
                failed += 1
                continue
            x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).to(device)
            with torch.no_grad():
                det = model([x])[0]
            keep = det["scores"] >= args.score_thr
            det = {k: v[keep] for k, v in det.items()}
            image_id = _image_id(path, index)
            if image_id in used_ids:
                image_id = index
            used_ids[image_id] = path
            rows = to_coco_results(det, image_id, category_ids)
            for r in rows:
                r["file_name"] = path
            results.extend(rows)
            summary = ", ".join(f"{model.class_names[int(l)]} {float(s):.2f}"
                                for l, s in zip(det["labels"][:5], det["scores"][:5]))
            print(f"{path}: {len(rows)} detections{': ' + summary if summary else ''}"
                  f"{' ...' if len(rows) > 5 else ''}")
            if not args.no_images:
                stem = os.path.splitext(os.path.basename(path))[0]
                out = os.path.join(args.output, f"{stem}.png")
                if os.path.exists(out) and any(os.path.splitext(os.path.basename(p))[0] == stem
                                               for p in paths[:index]):
                    out = os.path.join(args.output, f"{stem}_{index}.png")
                draw_detections(image, det, model.class_names, args.score_thr).save(out)
        json_path = os.path.join(args.output, "results.json")
        with open(json_path, "w") as f:
            json.dump(results, f)
        print(f"{len(results)} detections of {len(paths) - failed} images -> {json_path}")
    return 1 if failed and len(paths) == failed else 0
