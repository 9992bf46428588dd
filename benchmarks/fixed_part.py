"""Split a batch-1 forward into a size-independent part and a per-pixel part (issue #12's batch-1 analysis).

Times the fused model and convnext_tiny at two image sizes and fits ``time = fixed + per_pixel * pixels``: the
per-pixel parts compare the kernels' efficiency, the fixed part the cost of the op and module calls (and of
GEMMs too small to use both cores well). The two sizes are alternated call by call; on a drifting VM the fit still
moves by tens of ms between runs: repeat it and compare the spread, not one run.

    PYTHONPATH=. python benchmarks/fixed_part.py --threads 2 --sizes 224 320
"""
from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import overlock


def forward_ms(model: torch.nn.Module, sizes, repeats: int):
    """Median forward time per size, the sizes alternated call by call (the VMs drift within a run)."""
    inputs = [torch.randn(1, 3, s, s).contiguous(memory_format=torch.channels_last) for s in sizes]
    times = [[] for _ in sizes]
    with torch.inference_mode():
        for x in inputs:
            for _ in range(3):
                model(x)
        for r in range(repeats):
            for i in (range(len(sizes)) if r % 2 else reversed(range(len(sizes)))):
                t = time.perf_counter()
                model(inputs[i])
                times[i].append(time.perf_counter() - t)
    return [statistics.median(t) * 1e3 for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["overlock_t", "convnext_tiny"])
    ap.add_argument("--sizes", nargs=2, type=int, default=[224, 320])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=40)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    small, large = args.sizes
    ratio = (large / small) ** 2
    for name in args.models:
        model = timm.create_model(name).eval()
        if name.startswith("overlock"):
            model = overlock.fuse(model)
        model = model.to(memory_format=torch.channels_last)
        t_small, t_large = forward_ms(model, (small, large), args.repeats)
        fixed = (ratio * t_small - t_large) / (ratio - 1)
        print(f"{name}: {small}px {t_small:.1f} ms, {large}px {t_large:.1f} ms -> fixed {fixed:.1f} ms + "
              f"per-pixel {t_small - fixed:.1f} ms at {small}px ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
