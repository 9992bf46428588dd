"""``overlock train-seg``: UperNet-OverLoCK on ADE20K or your own masks; defaults are the official ADE20K recipe
(``upernet_overlock_*_ade20k_8xb2``: AdamW 6e-5, weight decay 0.01 without decay on norms, poly schedule after
1500 linear warm-up iterations, 160k iterations, global batch 16, 512x512 crops, aux loss 0.4)."""
from __future__ import annotations

import argparse

from .argtypes import positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data")
    d.add_argument("--data-dir", required=True, metavar="DIR",
                   help="ADE20K root (images/ + annotations/) or images/ + masks/ + classes.txt")
    d.add_argument("--train-split", default="train", help="train (or training)")
    d.add_argument("--val-split", default="val", help="val (or validation)")
    d.add_argument("--reduce-zero-label", dest="reduce_zero_label", action="store_true", default=None,
                   help="annotation 0 = ignore, v -> class v-1 (default: on for ADE20K, off with classes.txt)")
    d.add_argument("--no-reduce-zero-label", dest="reduce_zero_label", action="store_false")
    d.add_argument("-j", "--workers", type=int, default=4, metavar="N", help="data loading processes per rank")
    d.add_argument("--crop-size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"))
    d.add_argument("--scale", type=int, nargs=2, default=[2048, 512], metavar=("LONG", "SHORT"),
                   help="keep-ratio resize bound before the random ratio (train) and at test")
    d.add_argument("--ratio-range", type=float, nargs=2, default=[0.5, 2.0], metavar=("MIN", "MAX"))
    d.add_argument("--cat-max-ratio", type=float, default=0.75, help="crop rule: largest class share < this")
    d.add_argument("--flip", type=float, default=0.5)
    d.add_argument("--no-photometric", action="store_true", help="no photometric distortion")

    m = p.add_argument_group("model")
    m.add_argument("--model", default="overlock_t", help="overlock_{xt,t,s,b}")
    m.add_argument("--pretrained-path", default=None, metavar="FILE",
                   help="start from an ImageNet checkpoint (heads fresh) or a UperNet file (fresh classifiers if "
                        "the class count differs)")
    m.add_argument("--resume", default=None, metavar="FILE", help="continue a run from its last.pth (exactly)")
    m.add_argument("--drop-path", type=float, default=None, help="default: official 0.2 / 0.3 / 0.5 for T / S / B")
    m.add_argument("--channels", type=int, default=512, help="UperNet channels (official 512)")
    m.add_argument("--aux-channels", type=int, default=256, help="auxiliary FCN channels (official 256)")
    m.add_argument("--class-weight", type=float, nargs="+", default=None, metavar="W",
                   help="one loss weight per class, in class-list order (mmseg's class_weight; default: all 1); "
                        "e.g. weigh rare foreground classes above a dominant background")
    m.add_argument("--aux-loss-weight", type=float, default=0.4, help="0 trains without the auxiliary head")
    m.add_argument("--sync-bn", dest="sync_bn", action="store_true", default=True,
                   help="SyncBatchNorm under torchrun on CUDA (default, as the official SyncBN config)")
    m.add_argument("--no-sync-bn", dest="sync_bn", action="store_false")

    o = p.add_argument_group("optimization (official recipe)")
    o.add_argument("-b", "--batch-size", type=int, default=None, metavar="N",
                   help="per process (default: 16 / processes, the official global batch of 16)")
    o.add_argument("--iters", type=int, default=160000)
    o.add_argument("--lr", type=float, default=6e-5)
    o.add_argument("--weight-decay", type=float, default=0.01)
    o.add_argument("--no-decay-keys", nargs="*", default=["absolute_pos_embed", "relative_position_bias_table", "norm"],
                   metavar="KEY", help="parameters whose name contains a key get no weight decay (official keys; "
                   "OverLoCK's relative position biases are named rpb1/rpb2: add 'rpb' to exempt them too)")
    o.add_argument("--warmup-iters", type=int, default=1500)
    o.add_argument("--warmup-ratio", type=float, default=1e-6)
    o.add_argument("--power", type=float, default=1.0, help="poly schedule power")
    o.add_argument("--min-lr", type=float, default=0.0)
    o.add_argument("--amp", "--native-amp", dest="amp", action="store_true", help="mixed precision")
    o.add_argument("--amp-dtype", default=None, choices=["float16", "bfloat16"])
    o.add_argument("--seed", type=int, default=42)

    r = p.add_argument_group("run")
    r.add_argument("--output", default=None, metavar="DIR")
    r.add_argument("--eval-interval", type=int, default=8000, metavar="ITERS", help="official: 8000")
    r.add_argument("--checkpoint-interval", type=int, default=8000, metavar="ITERS",
                   help="also write last.pth every N iterations (it is always written at each evaluation)")
    r.add_argument("--log-interval", type=positive_int, default=50, metavar="ITERS",
                   help="iterations between rows of steps.csv")
    r.add_argument("--stop-after", type=int, default=0, metavar="ITERS",
                   help="end this process after ITERS iterations, writing last.pth (time-limited jobs: --resume it)")
    r.add_argument("--mode", choices=["whole", "slide"], default="whole", help="evaluation: whole image (official)")
    r.add_argument("--stride", type=int, nargs=2, default=[341, 341], metavar=("H", "W"), help="--mode slide")
    r.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")


def run(args: argparse.Namespace) -> int:
    import overlock  # noqa: F401
    from overlock.cli import friendly_errors
    from overlock.segmentation.train import train_segmentation

    with friendly_errors("overlock train-seg"):
        return train_segmentation(args)
