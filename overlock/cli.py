"""``overlock`` command line: one entry point, one module per subcommand in ``overlock.commands``."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from typing import List, Optional

# subcommand name -> module in overlock.commands providing ``add_arguments(parser)`` and ``run(args) -> int``
COMMANDS = {
    "train": "Train or fine-tune a model on an ImageFolder data set (single process or torchrun).",
    "validate": "Top-1/top-5, loss and throughput of a model on an ImageFolder split.",
    "predict": "Top-k labels for images or folders of images.",
    "info": "Parameters and FLOPs of every OverLoCK variant (computed).",
    "detect": "Object detection and instance segmentation (Mask R-CNN) on images: annotated PNGs, COCO JSON.",
    "detect-train": "Train Mask R-CNN + OverLoCK on COCO-format data (official recipe; torchrun, resume).",
    "detect-eval": "COCO box and mask AP of a Mask R-CNN checkpoint on COCO-format data.",
    "benchmark": "Inference and training throughput, latency and memory, side by side with any timm model.",
    "segment": "Semantic segmentation masks and overlays for images (UperNet-OverLoCK checkpoints).",
    "train-seg": "Train UperNet-OverLoCK for semantic segmentation (ADE20K or your own masks; official recipe).",
    "eval-seg": "mIoU, mAcc, aAcc and per-class IoU of a segmentation checkpoint on a data set split.",
    "convert": "Convert an official or project checkpoint to safetensors (with metadata), or back.",
    "inspect": "What a checkpoint file holds: task, variant, form, classes, EMA, parameters, differing keys.",
    "export": "Export a classifier in deploy form to ONNX or torch.export, verified against PyTorch.",
}


@contextlib.contextmanager
def friendly_errors(prog: str):
    """Turn the errors a user can fix (bad flag, data, checkpoint, missing file) into one line and exit code 2."""
    try:
        yield
    except user_errors() as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def user_errors() -> tuple:
    """The exception types whose message is meant for the user (they name the flag, file or key)."""
    from overlock.data import DataError
    from overlock.errors import UsageError
    from overlock.weights import CheckpointError
    return UsageError, DataError, CheckpointError, FileNotFoundError


def _module(name: str):
    return importlib.import_module(f"overlock.commands.{name.replace('-', '_')}")


def build_parser(argv: Optional[List[str]] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="overlock", description="OverLoCK models: train, validate, predict, "
                                     "inspect and benchmark.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = None
    if argv:
        wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # only import the module of the command being run (keeps `overlock info` fast)
        if wanted == name:
            _module(name).add_arguments(p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    if args.command in ("train", "validate", "predict", "segment", "train-seg", "eval-seg"):
        import torch
        # denormal floats appear in freshly initialised deep networks and slow CPU kernels many times over;
        # flushing them to zero changes nothing measurable
        torch.set_flush_denormal(True)
    try:
        return int(_module(args.command).run(args) or 0)
    except user_errors() as e:
        print(f"overlock {args.command}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:
        if isinstance(e.code, str):  # argparse-style exit with a message
            print(f"overlock {args.command}: error: {e.code}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
