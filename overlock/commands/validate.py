"""``overlock validate``: top-1/top-5, loss and throughput on an ImageFolder split (official validate.py)."""
from __future__ import annotations

import argparse
import json
import os

from ..errors import UsageError
from .argtypes import non_negative_int, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    from overlock.training.modeling import add_weight_arguments

    p.add_argument("data", nargs="?", default=None, metavar="DATA",
                   help="ImageFolder root (its --split folder is used) or a split folder itself")
    p.add_argument("--data-dir", default=None, metavar="DIR", help="same as DATA")
    p.add_argument("--split", default="val", help="split folder under DATA (default val)")
    p.add_argument("-b", "--batch-size", type=positive_int, default=128)
    p.add_argument("-j", "--workers", type=non_negative_int, default=4)
    p.add_argument("--results-file", default=None, metavar="FILE", help="write the results as JSON")
    add_weight_arguments(p)


def _split_dir(args) -> str:
    root = args.data or args.data_dir
    if not root:
        raise UsageError("give the data set: DATA or --data-dir DIR")
    from overlock.data.folder import resolve_split

    candidate = os.path.join(root, resolve_split(root, args.split))
    return candidate if os.path.isdir(candidate) else root


def run(args: argparse.Namespace) -> int:
    import overlock  # noqa: F401
    from overlock.cli import friendly_errors
    from overlock.data import DataError, ImageFolderSplit, check_image_folder, find_classes
    from overlock.data.loaders import eval_loader, eval_transform
    from overlock.training.distributed import cleanup, init_distributed
    from overlock.training.evaluate import evaluate
    from overlock.training.modeling import model_for_inference
    from overlock.training.run import autocast_for, setup_logging

    with friendly_errors("overlock validate"):
        info = init_distributed(args.device)
        setup_logging(info)
        try:
            split_dir = _split_dir(args)
            parent, split = os.path.split(os.path.normpath(split_dir))
            samples = check_image_folder(parent, (split,))[split]
            classes = find_classes(split_dir)
            model, names, cfg = model_for_inference(args, info.device)
            n_out = model.num_classes if hasattr(model, "num_classes") else None
            if names is not None and names != classes:
                raise DataError(f"{split_dir}: class folders differ from those the checkpoint was trained on "
                                f"({len(classes)} vs {len(names)} classes, first {classes[:3]} vs {names[:3]})")
            if n_out is not None and n_out != len(classes):
                raise DataError(f"{split_dir}: {len(classes)} class folders but the model predicts {n_out} classes "
                                "(ImageNet models need the 1000 synset folders, e.g. n01440764)")
            dataset = ImageFolderSplit(samples, classes, eval_transform(cfg), replace_bad=False)
            loader = eval_loader(dataset, args.batch_size, info.rank, info.world_size, args.workers, info.device)
            autocast, _ = autocast_for(args, info.device)
            metrics = evaluate(model, loader, info, autocast, args.channels_last, desc="validate")
            bad = dataset.bad_count.value
            result = {"model": getattr(model, "pretrained_cfg", {}).get("architecture", args.model),
                      "checkpoint": args.checkpoint or args.pretrained_path or ("official" if args.pretrained else None),
                      "split": split_dir, "reparam": args.reparam, "use_ema": args.use_ema,
                      "img_size": cfg["input_size"][-1], "crop_pct": cfg["crop_pct"],
                      "interpolation": cfg["interpolation"], **metrics, "unreadable_images": bad,
                      "world_size": info.world_size}
            if info.is_main:
                print(f"{result['model']}: top-1 {metrics['top1']:.3f}  top-5 {metrics['top5']:.3f}  "
                      f"loss {metrics['loss']:.4f}  ({metrics['images']} images, {metrics['img_per_s']:.1f} img/s"
                      f"{f', {bad} unreadable skipped' if bad else ''})")
                if args.results_file:
                    with open(args.results_file, "w") as f:
                        json.dump(result, f, indent=2)
        finally:
            cleanup()
    return 0
