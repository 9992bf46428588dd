"""Mask R-CNN + OverLoCK speed: inference latency at the official test size and one training step.

``python -m overlock.detection.bench --model overlock_t --mode infer --size 800 1333 --json out.json``
(random weights; the detection heads' cost does not depend on the weights, except through the number of
detections, which the official thresholds cap at 100). One process per measurement, like ``overlock
benchmark``; run it on a quiet machine. The JSON file holds the command, the machine (``cpu_isa``) and every
timing, like the ``overlock benchmark`` rows.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time

import torch

from ..training.optim import fused_kwargs


def measure(model_name: str, mode: str, size, batch: int, warmup: int, repeats: int, device: str) -> dict:
    from . import create_detection_model
    torch.set_flush_denormal(True)  # as every benchmark row: fresh weights produce denormals that slow CPUs down
    dev = torch.device(device)
    model = create_detection_model(model_name, num_classes=80).to(dev)
    h, w = size
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g).to(dev) for _ in range(batch)]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if mode == "infer":
        model.eval()

        def step():
            with torch.no_grad():
                model(images)
    else:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **fused_kwargs(model.parameters()))
        side = min(h, w) // 4
        targets = [{"boxes": torch.tensor([[w / 4, h / 4, w / 4 + side, h / 4 + side]], device=dev),
                    "labels": torch.tensor([1], device=dev),
                    "masks": torch.zeros(1, h, w, dtype=torch.uint8, device=dev)} for _ in range(batch)]
        for t in targets:
            t["masks"][0, h // 4:h // 4 + side, w // 4:w // 4 + side] = 1

        def step():
            losses = model(images, targets)
            opt.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            opt.step()
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return {"model": model_name, "mode": mode, "size": [h, w], "batch": batch, "device": str(dev),
            "median_s": statistics.median(times), "times_s": times, "images_per_s": batch / statistics.median(times),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="overlock_t")
    p.add_argument("--mode", default="infer", choices=["infer", "train"])
    p.add_argument("--size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"))
    p.add_argument("-b", "--batch-size", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, metavar="FILE")
    a = p.parse_args(argv)
    row = measure(a.model, a.mode, a.size, a.batch_size, a.warmup, a.repeats, a.device)
    print(json.dumps(row, indent=2))
    if a.json:
        from ..benchmark import environment
        with open(a.json, "w") as f:
            json.dump(dict(command="python -m overlock.detection.bench " + " ".join(sys.argv[1:] if argv is None
                                                                                 else argv),
                           environment=environment(), results=[row]), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
