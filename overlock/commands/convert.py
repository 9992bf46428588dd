"""``overlock convert SRC DST``: an official or project checkpoint to safetensors (with metadata), or back."""
from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="checkpoint to read: official .pth (raw, state_dict, model, "
                   "state_dict_ema), an overlock run checkpoint, an mmdet/mmseg file, or .safetensors; or an "
                   "official release file name (e.g. overlock_t_in1k_224.pth, maskrcnn1x_overlock_tiny_coco.pth), "
                   "downloaded to the cache directory")
    p.add_argument("dst", metavar="DST", help="file to write: .safetensors, or .pth/.pt for the PyTorch layout "
                   "({'state_dict': ..., 'meta': ...})")
    p.add_argument("--reparam", action="store_true",
                   help="write the deploy form (dilated branches merged, as the official *_reparam files)")
    p.add_argument("--no-aux", action="store_true",
                   help="leave out the auxiliary head (classification aux_head.*, UperNet auxiliary_head.*)")
    ema = p.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true", default=None,
                     help="take the EMA weights (state_dict_ema / model_ema); an error if there are none")
    ema.add_argument("--no-ema", dest="ema", action="store_false",
                     help="take the raw weights even when EMA weights are present (default: EMA when present)")
    p.add_argument("--class-names", default=None, metavar="FILE",
                   help="text file with one class name per line, stored in the metadata")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="with --reparam, skip running both forms on a 64x64 input (default: they must agree within "
                   "1e-4; costs seconds for the large variants)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def run(args: argparse.Namespace) -> int:
    from overlock.cli import friendly_errors
    from overlock.convert import convert_checkpoint

    with friendly_errors("overlock convert"):
        names = None
        if args.class_names:
            with open(args.class_names, encoding="utf-8") as f:
                names = [line.strip() for line in f if line.strip()]
        try:
            result = convert_checkpoint(args.src, args.dst, reparam=args.reparam, drop_aux=args.no_aux,
                                        ema=args.ema, class_names=names, overwrite=args.overwrite,
                                        verify=args.verify)
        except (ValueError, FileExistsError) as e:
            print(f"overlock convert: error: {e}", file=sys.stderr)
            return 2
    print(result)
    return 0
