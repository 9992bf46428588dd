"""Evaluation loop shared by ``overlock validate`` and the per-epoch validation of ``overlock train``."""
from __future__ import annotations

import contextlib
import time
from typing import Dict

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .distributed import DistInfo, all_reduce_sum


@torch.no_grad()
def evaluate(model, loader, info: DistInfo, autocast=contextlib.nullcontext, channels_last: bool = False,
             desc: str = "val", progress: bool = True) -> Dict[str, float]:
    """Top-1, top-5 (percent), mean cross-entropy and throughput over every readable image of the split,
    summed exactly over ranks."""
    model.eval()
    sums = [0.0, 0.0, 0.0, 0.0]  # loss sum, top-1 hits, top-5 hits, images
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, disable=None if (progress and info.is_main) else True, dynamic_ncols=True)
    for batch in bar:
        if batch is None:  # every image of the batch was unreadable
            continue
        images, targets = batch
        images = images.to(info.device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = targets.to(info.device, non_blocking=True)
        with autocast():
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(targets[:, None])
        sums[0] += F.cross_entropy(logits, targets, reduction="sum").item()
        sums[1] += hits[:, :1].sum().item()
        sums[2] += hits.sum().item()
        sums[3] += targets.numel()
    elapsed = time.perf_counter() - start
    loss, top1, top5, n = all_reduce_sum(sums, info)
    n_local = sums[3]
    if n == 0:
        raise RuntimeError(f"{desc}: no readable images to evaluate")
    return {"loss": loss / n, "top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "images": int(n),
            "img_per_s": n_local * info.world_size / max(elapsed, 1e-9)}
