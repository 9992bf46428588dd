"""Speed of UperNet-OverLoCK: inference at 512x512 and one training step (decode + 0.4 aux loss, AdamW), with our
default ContMix path beside the official method (our backbone on the natten-free ``unfold`` backend, NCHW, as the
official code runs) and, with ``--official-code DIR``, the official mmseg backbone itself (``segmentation/models/
overlock.py`` of a checkout of LMMMEng/OverLoCK), all with the same UperNet and FCN heads.

``python -m overlock.segmentation.bench --model overlock_t --img-size 512 --json row.json`` (row 6 of
``benchmarks/run.sh``). The JSON file holds the command, the machine (``cpu_isa``: timings differ between AVX2
and AVX-512) and every timing, like the ``overlock benchmark`` rows.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Dict, List, Optional

import torch

from ..training.optim import fused_kwargs

__all__ = ["measure_upernet"]


def measure_upernet(model: str = "overlock_t", mode: str = "infer", batch_size: int = 1, img_size: int = 512,
                    backend: str = "tiled", channels_last: bool = True, warmup: int = 1, repeats: int = 3,
                    num_classes: int = 150, device: str = "cpu", official_code: Optional[str] = None) -> Dict:
    """Median seconds per batch of one configuration (fresh weights; eval + inference mode for ``infer``).
    ``official_code``: a checkout of LMMMEng/OverLoCK; its segmentation backbone replaces ours (same heads)."""
    import overlock
    from overlock.segmentation import create_segmentation_model
    from overlock.segmentation.model import SEGMENTATION_DEFAULTS, OverLoCKUperNet
    from overlock.segmentation.train import seg_loss

    torch.set_flush_denormal(True)
    dev = torch.device(device)
    if official_code:
        from overlock.official_code import build_official_segmentation_backbone
        backbone = build_official_segmentation_backbone(official_code, model, **SEGMENTATION_DEFAULTS[model])
        net = OverLoCKUperNet(backbone, num_classes).to(dev)
    else:
        net = create_segmentation_model(model, num_classes).to(dev)
    x = torch.randn(batch_size, 3, img_size, img_size, device=dev)
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    if mode == "infer":
        net.eval()

        def step():
            with torch.inference_mode():
                net(x)
    else:
        net.train()
        y = torch.randint(0, num_classes, (batch_size, img_size, img_size), device=dev)
        opt = torch.optim.AdamW(net.parameters(), lr=6e-5, weight_decay=0.01, **fused_kwargs(net.parameters()))

        def step():
            decode, aux = net(x, return_heads=True)
            loss = seg_loss(decode, y) + 0.4 * seg_loss(aux, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    times: List[float] = []
    with overlock.use_backend(backend):
        for i in range(warmup + repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t)
    times.sort()
    median = times[len(times) // 2]
    return {"model": f"upernet_{model}", "mode": mode, "batch_size": batch_size, "img_size": img_size,
            "backbone": "official code" if official_code else "ours", "backend": None if official_code else backend, "channels_last": channels_last, "device": device, "seconds": median,
            "img_per_s": batch_size / median, "times": times, "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="overlock_t")
    p.add_argument("--mode", choices=["infer", "train"], nargs="+", default=["infer", "train"])
    p.add_argument("-b", "--batch-size", type=int, default=None,
                   help="default 1 for inference, 2 for training (BatchNorm of the 1x1 pooling branch needs 2)")
    p.add_argument("--img-size", type=int, default=512)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--official-code", default=None, metavar="DIR",
                   help="a checkout of LMMMEng/OverLoCK: also measure its own segmentation backbone (same heads)")
    p.add_argument("--json", default=None, metavar="FILE")
    a = p.parse_args(argv)
    rows = []
    runs = [("tiled", True, None), ("unfold", False, None)]  # ours, then the official method
    if a.official_code:
        runs.append(("unfold", False, a.official_code))  # the official code itself (its natten-free fallback)
    for mode in a.mode:
        for backend, cl, official in runs:
            b = a.batch_size or (1 if mode == "infer" else 2)
            row = measure_upernet(a.model, mode, b, a.img_size, backend, cl, a.warmup, a.repeats, device=a.device,
                                  official_code=official)
            rows.append(row)
            what = "official code" if official else f"{backend}{' channels_last' if cl else ''}"
            print(f"{row['model']} {mode} b{b} {a.img_size}px {what}: {row['seconds']:.3f} s/batch, "
                  f"{row['img_per_s']:.2f} img/s", flush=True)
    if a.json:
        from overlock.benchmark import environment
        with open(a.json, "w") as f:
            json.dump(dict(command="python -m overlock.segmentation.bench " + " ".join(sys.argv[1:] if argv is None
                                                                                    else argv),
                           environment=environment(), results=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
