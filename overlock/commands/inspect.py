"""``overlock inspect CHECKPOINT``: what a checkpoint holds, from its bytes and keys (no model is run)."""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="+", metavar="CHECKPOINT",
                   help=".pth/.pt/.safetensors files, or official release file names "
                   "(e.g. upernet_overlock_tiny_ade20k.pth; downloaded to the cache directory)")
    p.add_argument("--json", action="store_true", help="print JSON (one object per file, in a list)")
    p.add_argument("--strict", action="store_true",
                   help="exit with code 1 unless every key matches the nearest variant")


def run(args: argparse.Namespace) -> int:
    from overlock.cli import friendly_errors
    from overlock.inspection import inspect_checkpoint

    infos = []
    with friendly_errors("overlock inspect"):
        for path in args.checkpoint:
            infos.append(inspect_checkpoint(path))
            if not args.json:
                print(("\n" if len(infos) > 1 else "") + str(infos[-1]))
    if args.json:
        print(json.dumps([i.as_dict() for i in infos], indent=2))
    return 1 if args.strict and not all(i.exact for i in infos) else 0
