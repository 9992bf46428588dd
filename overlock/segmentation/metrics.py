"""mIoU, mAcc, aAcc and the per-class table, as mmseg 0.30's ``mean_iou``/``eval_metrics`` compute them.

Per image, pixels whose label is the ignore index are left out; intersection, union, predicted and labelled
areas are summed over the whole split before dividing (not averaged per image). A class that appears neither in
the labels nor the predictions has IoU NaN and is left out of the mean (``nanmean``), as in mmseg.
Percentages, like mmseg's printed table.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import numpy as np
import torch

__all__ = ["IoUAccumulator", "intersect_and_union", "summarize", "format_table"]


def intersect_and_union(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = 255):
    """Per-class (intersection, union, predicted area, label area) pixel counts for one image, float64."""
    keep = label != ignore_index
    pred, label = pred[keep].long(), label[keep].long()
    inter = torch.bincount(pred[pred == label], minlength=num_classes)[:num_classes]
    area_pred = torch.bincount(pred, minlength=num_classes)[:num_classes]
    area_label = torch.bincount(label, minlength=num_classes)[:num_classes]
    return torch.stack([inter, area_pred + area_label - inter, area_pred, area_label]).double()


class IoUAccumulator:
    """Sums the four per-class counts over images (and, with ``reduce``, over ranks)."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.totals = torch.zeros(4, num_classes, dtype=torch.float64)
        self.images = 0

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        self.totals += intersect_and_union(pred.cpu(), label.cpu(), self.num_classes, self.ignore_index)
        self.images += 1

    def reduce(self, info) -> None:
        from ..training.distributed import all_reduce_sum
        flat = all_reduce_sum(self.totals.flatten().tolist() + [self.images], info)
        self.totals = torch.tensor(flat[:-1], dtype=torch.float64).view(4, self.num_classes)
        self.images = int(flat[-1])


def _pct(x: float) -> Optional[float]:
    return None if math.isnan(x) else 100.0 * x


def summarize(totals: torch.Tensor, class_names: List[str]) -> Dict:
    """mIoU/mAcc/aAcc (percent) and per-class IoU/Acc (None where mmseg has NaN) from summed counts."""
    inter, union, _, area_label = (t.numpy() for t in totals)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
        acc = inter / area_label
        aacc = inter.sum() / area_label.sum()
    return {
        "mIoU": _pct(float(np.nanmean(iou))) if np.isfinite(iou).any() else None,
        "mAcc": _pct(float(np.nanmean(acc))) if np.isfinite(acc).any() else None,
        "aAcc": _pct(float(aacc)),
        "per_class": [{"class": name, "IoU": _pct(float(i)), "Acc": _pct(float(a))}
                      for name, i, a in zip(class_names, iou, acc)],
    }


def format_table(summary: Dict) -> str:
    def fmt(v):
        return "nan" if v is None else f"{v:.2f}"
    width = max([5] + [len(r["class"]) for r in summary["per_class"]])
    lines = [f"{'Class':<{width}} |   IoU |   Acc", f"{'-' * width}-+-------+------"]
    lines += [f"{r['class']:<{width}} | {fmt(r['IoU']):>5} | {fmt(r['Acc']):>5}" for r in summary["per_class"]]
    lines.append(f"aAcc {fmt(summary['aAcc'])}  mIoU {fmt(summary['mIoU'])}  mAcc {fmt(summary['mAcc'])}")
    return "\n".join(lines)
