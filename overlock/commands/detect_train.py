"""``overlock detect-train``: Mask R-CNN + OverLoCK on COCO-format data; defaults are the official recipe."""
from __future__ import annotations

import argparse

from .argtypes import positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data (COCO format: instances JSON + image folder)")
    d.add_argument("--train-ann", required=True, metavar="FILE", help="e.g. annotations/instances_train2017.json")
    d.add_argument("--train-images", required=True, metavar="DIR", help="e.g. train2017/")
    d.add_argument("--val-ann", default=None, metavar="FILE", help="evaluated (COCO box/mask AP) after each epoch")
    d.add_argument("--val-images", default=None, metavar="DIR")
    d.add_argument("-j", "--workers", type=int, default=2, metavar="N", help="data loading processes per rank")
    d.add_argument("--img-scale", type=int, nargs=2, default=[1333, 800], metavar=("LONG", "SHORT"),
                   help="keep-ratio resize limit (test, and training without --multiscale)")
    d.add_argument("--multiscale", dest="multiscale", action="store_true", default=None,
                   help="short edge drawn from 480, 512, ..., 800 (default with --schedule 3x)")
    d.add_argument("--no-multiscale", dest="multiscale", action="store_false")
    d.add_argument("--crop-aug", dest="crop_aug", action="store_true", default=None,
                   help="the 3x recipe's second policy, half of the time: resize to 400-600, random 384-600 crop, "
                        "multi-scale resize (default with --schedule 3x)")
    d.add_argument("--no-crop-aug", dest="crop_aug", action="store_false")
    d.add_argument("--flip", type=float, default=0.5, help="horizontal flip probability")

    m = p.add_argument_group("model")
    m.add_argument("--model", default="overlock_t", help="backbone: overlock_{xt,t,s,b}")
    m.add_argument("--pretrained-path", default=None, metavar="FILE",
                   help="ImageNet classification checkpoint (backbone) or a Mask R-CNN file (official or ours; "
                        "another class count gets fresh class layers)")
    m.add_argument("--drop-path", type=float, default=None, help="default: official 0.2/0.4/0.6 for t/s/b")
    m.add_argument("--fpn-channels", type=int, default=256)
    m.add_argument("--box-fc", type=int, default=1024, help="width of the box head's two fc layers")
    m.add_argument("--mask-channels", type=int, default=256)
    m.add_argument("--rcnn-samples", type=int, default=512, metavar="N",
                   help="RoIs sampled per image for the box/mask losses (official 512; fewer is faster)")
    m.add_argument("--sync-bn", action="store_true",
                   help="SyncBatchNorm over the GPUs of a torchrun (off: the official detectors keep per-GPU BN)")
    m.add_argument("--resume", default=None, metavar="FILE", help="continue a run from its last.pth (exactly)")

    o = p.add_argument_group("optimization (official recipe)")
    o.add_argument("--schedule", default="1x", choices=["1x", "3x"],
                   help="1x: 12 epochs, lr x0.1 at 8 and 11, lr 2e-4; 3x: 36 epochs, 27 and 33, lr 1e-4, multi-scale")
    o.add_argument("--epochs", type=int, default=None, help="default: the schedule's (lr steps scale with it)")
    o.add_argument("--lr-steps", type=int, nargs="*", default=None, metavar="EPOCH")
    o.add_argument("--lr", type=float, default=None)
    o.add_argument("--weight-decay", type=float, default=0.05)
    o.add_argument("--warmup-iters", type=int, default=500)
    o.add_argument("--warmup-ratio", type=float, default=0.001)
    o.add_argument("-b", "--batch-size", type=int, default=2, metavar="N",
                   help="images per process (official: 2 x 8 GPUs = 16)")
    o.add_argument("--clip-grad", type=float, default=None, metavar="NORM")
    o.add_argument("--amp", action="store_true", help="mixed precision")
    o.add_argument("--amp-dtype", default=None, choices=["float16", "bfloat16"])
    o.add_argument("--seed", type=int, default=0)

    r = p.add_argument_group("run")
    r.add_argument("--output", default=None, metavar="DIR")
    r.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS")
    r.add_argument("--log-interval", type=positive_int, default=50, metavar="STEPS",
                   help="steps between rows of steps.csv")
    r.add_argument("--val-freq", type=int, default=1, metavar="EPOCHS")
    r.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")


def run(args: argparse.Namespace) -> int:
    import torch

    from overlock.cli import friendly_errors
    from overlock.detection.train import train
    from overlock.errors import UsageError

    torch.set_flush_denormal(True)
    if args.val_ann and not args.val_images:
        raise UsageError("--val-ann needs --val-images (the folder of its images)")
    with friendly_errors("overlock detect-train"):
        return train(args)
