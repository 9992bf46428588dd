"""``overlock eval-seg``: mIoU, mAcc, aAcc and the per-class IoU table of a UperNet-OverLoCK checkpoint, as mmseg
computes them (whole-image test at the official (2048, 512) resize, or sliding window)."""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", required=True, metavar="DIR", help="as for train-seg")
    p.add_argument("--split", default="val", help="val (or validation)")
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="official UperNet file or train-seg checkpoint")
    p.add_argument("--model", default=None, help="overlock_{xt,t,s,b}; read from the checkpoint when omitted")
    p.add_argument("--reduce-zero-label", dest="reduce_zero_label", action="store_true", default=None)
    p.add_argument("--no-reduce-zero-label", dest="reduce_zero_label", action="store_false")
    p.add_argument("--scale", type=int, nargs=2, default=[2048, 512], metavar=("LONG", "SHORT"))
    p.add_argument("--mode", choices=["whole", "slide"], default="whole")
    p.add_argument("--crop-size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"))
    p.add_argument("--stride", type=int, nargs=2, default=[341, 341], metavar=("H", "W"))
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("--results-file", default=None, metavar="JSON", help="write the metrics and per-class table")
    p.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    import overlock
    from overlock.cli import friendly_errors
    from overlock.data import DataError
    from overlock.segmentation.data import SegDataset, find_layout
    from overlock.segmentation.metrics import format_table
    from overlock.segmentation.model import model_from_checkpoint
    from overlock.segmentation.train import _eval_loader, evaluate_segmentation
    from overlock.training.distributed import cleanup, init_distributed

    with friendly_errors("overlock eval-seg"):
        info = init_distributed(args.device)
        try:
            layout = find_layout(args.data_dir, (args.split,), args.reduce_zero_label)
            model = overlock.fuse(model_from_checkpoint(args.checkpoint, args.model).eval()).to(info.device)
            if model.num_classes != len(layout.classes):
                raise DataError(f"{args.data_dir}: {len(layout.classes)} classes but {args.checkpoint} segments "
                                f"{model.num_classes}")
            data = SegDataset(layout.splits[args.split], len(layout.classes), layout.reduce_zero_label,
                              test_scale=args.scale)
            result = evaluate_segmentation(model, _eval_loader(data, info, args.workers), info, layout.classes,
                                           mode=args.mode, crop=tuple(args.crop_size), stride=tuple(args.stride))
            result.update(checkpoint=args.checkpoint, data_dir=args.data_dir, split=args.split, mode=args.mode,
                          skipped=int(data.bad_count.value))
            if info.is_main:
                print(format_table(result))
                if args.results_file:
                    with open(args.results_file, "w") as f:
                        json.dump(result, f, indent=2)
        finally:
            cleanup()
    return 0
