"""``overlock train``: flags keep the names of the official train.py; defaults are its ImageNet recipe."""
from __future__ import annotations

import argparse

from .argtypes import non_negative_float, non_negative_int, positive_float, positive_int, probability


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data")
    d.add_argument("--data-dir", required=True, metavar="DIR", help="ImageFolder root with train/ and val/")
    d.add_argument("--train-split", default="train", metavar="NAME")
    d.add_argument("--val-split", default="val", metavar="NAME")
    d.add_argument("-j", "--workers", type=non_negative_int, default=4, metavar="N", help="data loading processes per rank")
    d.add_argument("--img-size", type=positive_int, default=None, metavar="N", help="input side (default: model's, 224)")
    d.add_argument("--crop-pct", type=probability, default=None, help="validation crop fraction (default: model's)")

    m = p.add_argument_group("model")
    m.add_argument("--model", default="overlock_xt", help="overlock_{xt,t,s,b} (or any timm model)")
    m.add_argument("--num-classes", type=positive_int, default=None, help="checked against the class folders if given")
    m.add_argument("--pretrained", action="store_true", help="start from the official ImageNet weights (download)")
    m.add_argument("--pretrained-path", default=None, metavar="FILE",
                   help="start from a local official/ImageNet checkpoint; a different class count gets fresh heads")
    m.add_argument("--initial-checkpoint", default=None, metavar="FILE",
                   help="start from these weights (same classes); optimizer and schedule start fresh")
    m.add_argument("--resume", default=None, metavar="FILE", help="continue a run from its last.pth (exactly)")
    m.add_argument("--drop-path", type=probability, default=None, help="stochastic depth rate (official: 0.1/0.15/0.4/0.5)")
    m.add_argument("--aux-loss-ratio", type=non_negative_float, default=0.4, help="weight of the auxiliary (Overview-Net) loss; "
                   "0 trains without deep supervision")
    m.add_argument("--grad-checkpoint", action="store_true", help="gradient checkpointing (less memory)")
    m.add_argument("--ckpt-stg", type=non_negative_int, nargs=4, default=[0, 0, 0, 0], metavar="N",
                   help="with --grad-checkpoint: blocks to checkpoint per stage (official); all 0 = every block")
    m.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    m.add_argument("--sync-bn", dest="sync_bn", action="store_true", default=True,
                   help="SyncBatchNorm under torchrun on CUDA (default, as the official script)")
    m.add_argument("--no-sync-bn", dest="sync_bn", action="store_false")

    o = p.add_argument_group("optimization (official recipe)")
    o.add_argument("-b", "--batch-size", type=positive_int, default=128, metavar="N", help="batch size per process")
    o.add_argument("-vb", "--validation-batch-size", type=positive_int, default=None, metavar="N")
    o.add_argument("--epochs", type=positive_int, default=300)
    o.add_argument("--cooldown-epochs", type=non_negative_int, default=0,
                   help="extra epochs at --min-lr after --epochs (the official train.py adds 10: pass 10 to match)")
    o.add_argument("--warmup-epochs", type=non_negative_int, default=5)
    o.add_argument("--lr", type=positive_float, default=1e-3)
    o.add_argument("--auto-lr", action="store_true", help="lr = global batch / 1024 * 1e-3 (official)")
    o.add_argument("--warmup-lr", type=non_negative_float, default=1e-6)
    o.add_argument("--min-lr", type=non_negative_float, default=1e-5)
    o.add_argument("--sched", default="cosine")
    o.add_argument("--sched-on-updates", action="store_true", help="step the schedule every update, not epoch")
    o.add_argument("--opt", default="adamw")
    o.add_argument("--opt-eps", type=positive_float, default=None)
    o.add_argument("--weight-decay", type=non_negative_float, default=0.05)
    o.add_argument("--clip-grad", type=positive_float, default=None, metavar="NORM")
    o.add_argument("--clip-mode", default="norm", choices=["norm", "value", "agc"])
    o.add_argument("--amp", "--native-amp", dest="amp", action="store_true", help="mixed precision")
    o.add_argument("--amp-dtype", default=None, choices=["float16", "bfloat16"],
                   help="default: float16 (+ loss scaling) on CUDA, bfloat16 on CPU")
    o.add_argument("--model-ema", action="store_true", help="keep an EMA of the weights")
    o.add_argument("--model-ema-decay", type=probability, default=0.9999)
    o.add_argument("--model-ema-force-cpu", action="store_true")
    o.add_argument("--seed", type=int, default=42)

    a = p.add_argument_group("augmentation (official recipe)")
    a.add_argument("--no-aug", action="store_true", help="resize, crop and normalise only")
    a.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="RandAugment policy ('' for none)")
    a.add_argument("--scale", type=probability, nargs=2, default=[0.08, 1.0])
    a.add_argument("--ratio", type=positive_float, nargs=2, default=[3 / 4, 4 / 3])
    a.add_argument("--hflip", type=probability, default=0.5)
    a.add_argument("--vflip", type=probability, default=0.0)
    a.add_argument("--color-jitter", type=non_negative_float, default=0.4)
    a.add_argument("--train-interpolation", default="random")
    a.add_argument("--reprob", type=probability, default=0.25, help="random erasing probability")
    a.add_argument("--remode", default="pixel")
    a.add_argument("--recount", type=positive_int, default=1)
    a.add_argument("--mixup", type=non_negative_float, default=0.8)
    a.add_argument("--cutmix", type=non_negative_float, default=1.0)
    a.add_argument("--mixup-prob", type=probability, default=1.0)
    a.add_argument("--mixup-switch-prob", type=probability, default=0.5)
    a.add_argument("--smoothing", type=probability, default=0.1, help="label smoothing")

    r = p.add_argument_group("run")
    r.add_argument("--output", default=None, metavar="DIR",
                   help="run directory (default: output/MODEL-TIME, or the --resume file's directory)")
    r.add_argument("--checkpoint-every", type=non_negative_int, default=0, metavar="STEPS",
                   help="also write last.pth every N optimizer steps (a kill loses at most N steps)")
    r.add_argument("--log-interval", type=positive_int, default=50, metavar="STEPS", help="steps between rows of steps.csv")
    r.add_argument("--val-freq", type=positive_int, default=1, metavar="EPOCHS")
    r.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")


def run(args: argparse.Namespace) -> int:
    import overlock  # noqa: F401 - registers the models
    from overlock.cli import friendly_errors
    from overlock.training.trainer import train

    with friendly_errors("overlock train"):
        return train(args)
