"""COCO box and mask AP (pycocotools ``COCOeval``) of a detection model on a COCO-format split."""
from __future__ import annotations

import contextlib
import io
import time
from typing import Dict, List, Tuple

import torch
from tqdm import tqdm

from ..training.distributed import DistInfo
from .results import to_coco_results

__all__ = ["evaluate_coco", "coco_ap", "STAT_NAMES"]

STAT_NAMES = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")


def coco_ap(coco_gt, results: List[dict], iou_types=("bbox", "segm")) -> Tuple[Dict[str, float], str]:
    """``{bbox_mAP, bbox_mAP_50, ..., segm_mAP_l}`` (0-1, as mmdet reports) and COCOeval's printed table."""
    from pycocotools.cocoeval import COCOeval
    metrics, text = {}, []
    for iou_type in iou_types:
        rows = [r for r in results if iou_type == "bbox" or "segmentation" in r]
        if not rows:
            metrics.update({f"{iou_type}_{n}": 0.0 for n in STAT_NAMES})
            text.append(f"{iou_type}: no detections")
            continue
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            dt = coco_gt.loadRes(rows)
            ev = COCOeval(coco_gt, dt, iou_type)
            ev.params.imgIds = sorted({r["image_id"] for r in rows} | set(coco_gt.getImgIds()))
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        metrics.update({f"{iou_type}_{n}": float(max(v, 0.0)) for n, v in zip(STAT_NAMES, ev.stats[:6])})
        text.append(f"Evaluating {iou_type}\n" + "\n".join(line for line in buf.getvalue().splitlines()
                                                          if line.startswith(" Average")))
    return metrics, "\n".join(text)


@torch.no_grad()
def evaluate_coco(model, dataset, info: DistInfo, autocast=contextlib.nullcontext, progress: bool = True,
                  desc: str = "eval") -> Tuple[Dict[str, float], List[dict], str]:
    """Detections of every image (sharded over ranks, gathered on all), then COCO AP on rank 0's copy."""
    import torch.distributed as dist
    model.eval()
    category_ids = dataset.cat_ids
    indices = list(range(info.rank, len(dataset), info.world_size))
    results, start = [], time.perf_counter()
    for index in tqdm(indices, desc=desc, leave=False, disable=None if (progress and info.is_main) else True,
                      dynamic_ncols=True):
        item = dataset[index]
        if item is None:
            continue
        image, target = item
        with autocast():
            det = model([image.to(info.device)])[0]
        det = {k: v.float() if v.is_floating_point() else v for k, v in det.items()}
        results.extend(to_coco_results(det, int(target["image_id"]), category_ids))
    if info.distributed:
        gathered = [None] * info.world_size
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    metrics, table = coco_ap(dataset.coco, results)
    metrics["eval_img_per_s"] = len(dataset) / max(time.perf_counter() - start, 1e-9)
    return metrics, results, table
