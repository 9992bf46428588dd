"""mmdetection 2.28's test-time arithmetic, written on torch/torchvision ops.

torchvision computes a slightly different function in each of these places (rounded anchors, strides inferred
from the padded image, box coder weights as divisors, its own RoI-to-level rule, mask pasting by resize and a
box-count switch for batched NMS at another size), so the official Mask R-CNN needs them redone with mmdet's
order of operations. Every function here mirrors one mmdet/mmcv function; the names say which.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torchvision.ops import nms, roi_align

__all__ = ["base_anchors", "grid_anchors", "delta2bbox", "bbox2delta", "batched_nms", "multiclass_nms",
           "map_roi_levels", "multilevel_roi_align", "boxes_to_rois", "paste_masks"]

WH_RATIO_CLIP = 16 / 1000


def base_anchors(stride: int, scales: Sequence[float], ratios: Sequence[float]) -> torch.Tensor:
    """mmdet AnchorGenerator base anchors: centre offset 0, not rounded, ratio-major (``scale_major``)."""
    ratios_t = torch.tensor(ratios, dtype=torch.float32)
    scales_t = torch.tensor(scales, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios_t)
    w_ratios = 1 / h_ratios
    ws = (stride * w_ratios[:, None] * scales_t[None, :]).reshape(-1)
    hs = (stride * h_ratios[:, None] * scales_t[None, :]).reshape(-1)
    return torch.stack([0.0 - 0.5 * ws, 0.0 - 0.5 * hs, 0.0 + 0.5 * ws, 0.0 + 0.5 * hs], dim=-1)


def grid_anchors(base: torch.Tensor, feat_size: Tuple[int, int], stride: int, device=None) -> torch.Tensor:
    """All anchors of one level, ordered (y, x, anchor) like the head's flattened outputs."""
    h, w = int(feat_size[0]), int(feat_size[1])
    base = base.to(device=device, dtype=torch.float32)
    shift_x = torch.arange(0, w, device=device).to(torch.float32) * stride
    shift_y = torch.arange(0, h, device=device).to(torch.float32) * stride
    xx = shift_x.repeat(h)
    yy = shift_y.view(-1, 1).repeat(1, w).view(-1)
    shifts = torch.stack([xx, yy, xx, yy], dim=-1)
    return (base[None, :, :] + shifts[:, None, :]).view(-1, 4)


def delta2bbox(rois: torch.Tensor, deltas: torch.Tensor, stds: Sequence[float],
               max_shape=None) -> torch.Tensor:
    """mmdet DeltaXYWHBBoxCoder.decode (means 0): ``deltas`` (N, 4k) against ``rois`` (N, 4), clipped to
    ``max_shape`` (h, w) when given."""
    num, k = deltas.size(0), deltas.size(1) // 4
    if num == 0:
        return deltas
    d = deltas.reshape(-1, 4)
    std = d.new_tensor(stds).view(1, -1)
    d = d * std + d.new_zeros(1, 4)
    dxy, dwh = d[:, :2], d[:, 2:]
    r = rois.repeat(1, k).reshape(-1, 4)
    pxy = (r[:, :2] + r[:, 2:]) * 0.5
    pwh = r[:, 2:] - r[:, :2]
    dxy_wh = pwh * dxy
    max_ratio = abs(math.log(WH_RATIO_CLIP))
    dwh = dwh.clamp(min=-max_ratio, max=max_ratio)
    gxy = pxy + dxy_wh
    gwh = pwh * dwh.exp()
    boxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
    if max_shape is not None:
        boxes[..., 0::2].clamp_(min=0, max=max_shape[1])
        boxes[..., 1::2].clamp_(min=0, max=max_shape[0])
    return boxes.reshape(num, -1)


def bbox2delta(proposals: torch.Tensor, gt: torch.Tensor, stds: Sequence[float]) -> torch.Tensor:
    """mmdet DeltaXYWHBBoxCoder.encode (means 0): regression targets of ``gt`` against ``proposals``."""
    proposals = proposals.float()
    gt = gt.float()
    px = (proposals[..., 0] + proposals[..., 2]) * 0.5
    py = (proposals[..., 1] + proposals[..., 3]) * 0.5
    pw = proposals[..., 2] - proposals[..., 0]
    ph = proposals[..., 3] - proposals[..., 1]
    gx = (gt[..., 0] + gt[..., 2]) * 0.5
    gy = (gt[..., 1] + gt[..., 3]) * 0.5
    gw = gt[..., 2] - gt[..., 0]
    gh = gt[..., 3] - gt[..., 1]
    deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=-1)
    return deltas / deltas.new_tensor(stds)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float,
                split_thr: int = 10000) -> torch.Tensor:
    """mmcv.ops.batched_nms: indices kept, by decreasing score.

    Below ``split_thr`` boxes, groups are separated by offsetting coordinates (which changes the IoU arithmetic
    slightly, as in mmcv); above it, NMS runs group by group and the survivors are sorted by score.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    max_coordinate = boxes.max()
    offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))
    boxes_for_nms = boxes + offsets[:, None]  # mmcv offsets in both forms (it changes IoU rounding)
    if boxes.shape[0] < split_thr:
        return nms(boxes_for_nms, scores, iou_threshold)
    total = torch.zeros_like(scores, dtype=torch.bool)
    kept_scores = torch.zeros_like(scores)
    for group in torch.unique(idxs):
        mask = (idxs == group).nonzero(as_tuple=False).view(-1)
        keep = nms(boxes_for_nms[mask], scores[mask], iou_threshold)
        total[mask[keep]] = True
        kept_scores[mask[keep]] = scores[mask[keep]]
    keep = total.nonzero(as_tuple=False).view(-1)
    _, order = kept_scores[keep].sort(descending=True)
    return keep[order]


def multiclass_nms(multi_bboxes: torch.Tensor, multi_scores: torch.Tensor, score_thr: float, iou_threshold: float,
                   max_num: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """mmdet multiclass_nms: class-specific boxes (N, 4C), softmax scores (N, C+1, background last) ->
    detections (n, 5) and 0-based labels (n,)."""
    num_classes = multi_scores.size(1) - 1
    if multi_bboxes.shape[1] > 4:
        bboxes = multi_bboxes.view(multi_scores.size(0), -1, 4)
    else:
        bboxes = multi_bboxes[:, None].expand(multi_scores.size(0), num_classes, 4)
    scores = multi_scores[:, :-1]
    labels = torch.arange(num_classes, dtype=torch.long, device=scores.device).view(1, -1).expand_as(scores)
    bboxes, scores, labels = bboxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)
    inds = (scores > score_thr).nonzero(as_tuple=False).squeeze(1)
    bboxes, scores, labels = bboxes[inds], scores[inds], labels[inds]
    if bboxes.numel() == 0:
        return torch.cat([bboxes, scores[:, None]], -1), labels
    keep = batched_nms(bboxes, scores, labels, iou_threshold)
    if max_num > 0:
        keep = keep[:max_num]
    return torch.cat([bboxes[keep], scores[keep, None]], -1), labels[keep]


def boxes_to_rois(boxes: List[torch.Tensor]) -> torch.Tensor:
    """mmdet bbox2roi: (K, 5) rows ``[image index, x1, y1, x2, y2]``."""
    rois = [torch.cat([b.new_full((b.size(0), 1), i), b[:, :4]], dim=-1) for i, b in enumerate(boxes)]
    return torch.cat(rois, 0) if rois else boxes[0].new_zeros(0, 5)


def map_roi_levels(rois: torch.Tensor, num_levels: int, finest_scale: int = 56) -> torch.Tensor:
    """mmdet SingleRoIExtractor level rule: floor(log2(sqrt(area) / 56)), clamped to the levels."""
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(min=0, max=num_levels - 1).long()


def multilevel_roi_align(feats: List[torch.Tensor], rois: torch.Tensor, output_size: int,
                         strides: Sequence[int], finest_scale: int = 56) -> torch.Tensor:
    """mmdet SingleRoIExtractor with RoIAlign(aligned=True, sampling_ratio=0) on each RoI's level."""
    out = feats[0].new_zeros(rois.size(0), feats[0].size(1), output_size, output_size)
    if rois.numel() == 0:
        return out
    levels = map_roi_levels(rois, len(feats), finest_scale)
    for i, (feat, stride) in enumerate(zip(feats, strides)):
        inds = (levels == i).nonzero(as_tuple=False).squeeze(1)
        if inds.numel() > 0:
            out[inds] = roi_align(feat, rois[inds].to(feat.dtype), (output_size, output_size),
                                  spatial_scale=1.0 / stride, sampling_ratio=0, aligned=True)
        elif torch.is_grad_enabled() and feat.requires_grad:
            out = out + feat.sum() * 0.0  # keep every level in the graph (DDP)
    return out


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, img_h: int, img_w: int,
                threshold: float = 0.5) -> torch.Tensor:
    """mmdet FCNMaskHead.get_seg_masks pasting, CPU form: each (M, M) probability map is sampled bilinearly
    (grid_sample, align_corners=False) over its box's pixel range widened by one pixel, then thresholded."""
    n = masks.shape[0]
    out = torch.zeros(n, img_h, img_w, dtype=torch.bool, device=masks.device)
    masks = masks.to(torch.float32)
    coords = boxes.detach().cpu().tolist()
    for i in range(n):
        box = boxes[i:i + 1]
        bx0, by0, bx1, by1 = coords[i]
        x0_int, y0_int = max(math.floor(bx0) - 1, 0), max(math.floor(by0) - 1, 0)
        x1_int, y1_int = min(math.ceil(bx1) + 1, img_w), min(math.ceil(by1) + 1, img_h)
        x0, y0, x1, y1 = torch.split(box, 1, dim=1)
        img_y = torch.arange(y0_int, y1_int, device=masks.device).to(torch.float32) + 0.5
        img_x = torch.arange(x0_int, x1_int, device=masks.device).to(torch.float32) + 0.5
        img_y = (img_y - y0) / (y1 - y0) * 2 - 1
        img_x = (img_x - x0) / (x1 - x0) * 2 - 1
        img_x = torch.where(torch.isinf(img_x), torch.zeros_like(img_x), img_x)
        img_y = torch.where(torch.isinf(img_y), torch.zeros_like(img_y), img_y)
        gx = img_x[:, None, :].expand(1, img_y.size(1), img_x.size(1))
        gy = img_y[:, :, None].expand(1, img_y.size(1), img_x.size(1))
        grid = torch.stack([gx, gy], dim=3)
        if grid.shape[1] == 0 or grid.shape[2] == 0:
            continue
        pasted = F.grid_sample(masks[i:i + 1, None], grid, align_corners=False)[0, 0]
        out[i, y0_int:y1_int, x0_int:x1_int] = pasted >= threshold
    return out
