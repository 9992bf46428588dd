"""``overlock info``: parameters and FLOPs of the OverLoCK variants, computed from the models."""
from __future__ import annotations

import argparse
import json

from ..errors import UsageError
from .argtypes import positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", nargs="+", default=None, help="variants to show (default: all four)")
    p.add_argument("--img-size", type=positive_int, default=224, help="input side for the FLOP count (default 224)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    import overlock
    from overlock.profile import model_summary

    names = args.model or list(overlock.VARIANTS)
    for name in names:
        base = name[:-len("_reparam")] if name.endswith("_reparam") else name
        if base not in overlock.VARIANTS:
            raise UsageError(f"unknown model {name!r}; choose from {', '.join(overlock.VARIANTS)}")
    rows = [model_summary(name, args.img_size) for name in names]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"| model | params (M, deploy, no aux) | params (M, training form, no aux) | "
          f"GFLOPs @{args.img_size} (paper method) | GFLOPs incl. aggregation |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params_m']:.2f} | {r['params_train_m']:.2f} | {r['gmacs']:.2f} | "
              f"{r['gmacs_total']:.2f} |")
    print("\nGFLOPs are multiply-accumulates (as in the paper). 'paper method': convolutions and matrix products "
          "without the neighbourhood aggregation, which the paper's counter does not see.")
    from overlock.ops import native
    print(f"Hand-written CPU kernels (depthwise convs, ContMix aggregation, GRN scale): {native.describe()}")
    return 0
