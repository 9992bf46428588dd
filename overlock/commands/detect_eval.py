"""``overlock detect-eval``: COCO box and mask AP of a Mask R-CNN checkpoint on a COCO-format split."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="official mmdet file or ours")
    p.add_argument("--ann", required=True, metavar="FILE", help="COCO instances JSON, e.g. instances_val2017.json")
    p.add_argument("--images", required=True, metavar="DIR", help="its image folder")
    p.add_argument("--model", default=None, help="overlock_{xt,t,s,b}; default: read from the checkpoint")
    p.add_argument("--img-scale", type=int, nargs=2, default=None, metavar=("LONG", "SHORT"),
                   help="test resize limit (default: the one stored with the checkpoint, else 1333 800)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the metrics as JSON")
    p.add_argument("--results", default=None, metavar="FILE", help="write the detections (COCO results format)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")


def run(args: argparse.Namespace) -> int:
    import overlock
    import json

    import torch

    from overlock.cli import friendly_errors
    from overlock.data import DataError
    from overlock.detection.build import COCO_CLASSES, create_detection_model, infer_variant
    from overlock.detection.data import CocoInstances
    from overlock.detection.evaluate import evaluate_coco
    from overlock.training.distributed import init_distributed
    from overlock.weights import read_checkpoint

    torch.set_flush_denormal(True)
    with friendly_errors("overlock detect-eval"):
        info = init_distributed(args.device)
        data = CocoInstances(args.ann, args.images)
        obj = read_checkpoint(args.checkpoint)
        kwargs = {"test_scale": (max(args.img_scale), min(args.img_scale))} if args.img_scale else {}
        model = overlock.fuse(create_detection_model(args.model or infer_variant(obj), checkpoint=obj,
                                                     **kwargs).eval()).to(info.device)
        if model.num_classes != len(data.class_names):
            raise DataError(f"{args.ann}: {len(data.class_names)} categories, the checkpoint detects "
                            f"{model.num_classes}")
        if list(model.class_names) != list(data.class_names) and tuple(model.class_names) != COCO_CLASSES:
            print(f"overlock detect-eval: warning: class names differ from {args.ann}'s categories; labels are "
                  "matched by order")
        metrics, results, table = evaluate_coco(model, data, info)
        if data.report:
            print(f"{args.ann}: {data.summary()}")
        print(table)
        print("box AP {:.1f} | mask AP {:.1f}".format(100 * metrics["bbox_mAP"], 100 * metrics["segm_mAP"]))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(metrics, f, indent=2)
        if args.results:
            with open(args.results, "w") as f:
                json.dump(results, f)
    return 0
