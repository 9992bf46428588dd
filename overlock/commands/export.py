"""``overlock export CHECKPOINT``: ONNX or torch.export of a classifier in deploy form, verified against PyTorch."""
from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="classification or UperNet segmentation checkpoint (official or project, training or deploy form, .pth or "
                   ".safetensors, or an official release file name)")
    p.add_argument("--format", choices=["onnx", "torch-export"], nargs="+", default=["onnx"],
                   help="onnx (opset >= 17, verified with onnxruntime) and/or torch-export (.pt2, torch.export.save); "
                   "both from one trace")
    p.add_argument("-o", "--output", default=None, metavar="FILE",
                   help="file to write (default: CHECKPOINT's name with .onnx or .pt2); with two formats, the path "
                   "without suffix")
    p.add_argument("--img-size", type=int, nargs="+", default=[224], metavar="N",
                   help="input side, or height and width; the exported file accepts this size only (default 224)")
    p.add_argument("-b", "--batch-size", type=int, default=2,
                   help="batch size of the tracing example; the file accepts any batch size (default 2)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, 17 or newer (default 18)")
    ema = p.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true", default=None, help="export the EMA weights")
    ema.add_argument("--no-ema", dest="ema", action="store_false", help="export the raw weights even with EMA")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest relative error against PyTorch accepted by the verification (default 1e-4)")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")


def run(args: argparse.Namespace) -> int:
    import os

    from overlock.cli import friendly_errors
    from overlock.export import ExportError, export_checkpoint

    if len(args.img_size) not in (1, 2):
        raise SystemExit("--img-size takes one side or a height and a width")
    height, width = (args.img_size * 2)[:2]
    from overlock.export import SUFFIX
    formats = list(dict.fromkeys(args.format))
    output = args.output or os.path.splitext(os.path.basename(args.checkpoint))[0] + (
        SUFFIX[formats[0]] if len(formats) == 1 else "")
    targets = [output] if len(formats) == 1 else [output + SUFFIX[f] for f in formats]
    for target in targets:
        if os.path.exists(target) and not args.overwrite:
            raise SystemExit(f"{target} exists; pass --overwrite to replace it")
    with friendly_errors("overlock export"):
        try:
            results = export_checkpoint(args.checkpoint, output, formats, (height, width), args.batch_size,
                                        args.opset, args.ema, args.tolerance)
        except (ExportError, ValueError) as e:
            print(f"overlock export: error: {e}", file=sys.stderr)
            return 3 if isinstance(e, ExportError) and "differs from PyTorch" in str(e) else 2
    print("\n".join(map(str, results)))
    return 0
