"""The official Mask R-CNN + OverLoCK (mmdetection 2.28 ``mask_rcnn_overlock_*_fpn_*_coco``) on torchvision.

Built from torchvision's detection modules (``GeneralizedRCNN``, ``FeaturePyramidNetwork``, ``RPNHead``,
``RegionProposalNetwork``, ``RoIHeads``, ``TwoMLPHead``, ``MaskRCNNHeads``, ``roi_align``, ``nms``); the
subclasses below replace the places where torchvision computes another function than mmdet (anchors, box
coding, proposal filtering, RoI levels, detection post-processing, mask pasting, preprocessing).
Training reuses torchvision's assigners, samplers and mask targets, with mmdet's loss functions (L1 box losses,
background-last softmax).

The box and mask predictors keep mmdet's parameter layout (classifier with the background *last*, 4 box deltas
per foreground class, one mask channel per foreground class) so that official checkpoints load 1:1; they hand
torchvision's losses the layout those expect (background first).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from . import mmdet_ops as ops
from .transform import MMDetTransform

__all__ = ["OverLoCKMaskRCNN", "OverLoCKFPN", "STRIDES"]

STRIDES = (4, 8, 16, 32, 64)  # FPN levels P2-P6; RoIs read P2-P5
RPN_STDS = (1.0, 1.0, 1.0, 1.0)
RCNN_STDS = (0.1, 0.1, 0.2, 0.2)


class OverLoCKFPN(nn.Module):
    """OverLoCK dense backbone + FPN (mmdet ``FPN``: 1x1 laterals, nearest top-down, 3x3 outputs, P6 = P5
    max-pooled with stride 2). Returns torchvision's ordered dict ``'0'..'3', 'pool'``."""

    def __init__(self, body: nn.Module, out_channels: int = 256):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(list(body.out_channels), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


class MMDetAnchorGenerator(AnchorGenerator):
    """mmdet anchors: fixed strides (not inferred from the padded size), base anchors neither rounded nor
    offset."""

    def __init__(self, strides: Sequence[int] = STRIDES, scales=(8.0,), ratios=(0.5, 1.0, 2.0)):
        super().__init__(sizes=tuple((s * scales[0],) for s in strides), aspect_ratios=(tuple(ratios),) * len(strides))
        self.strides = tuple(strides)
        self.base = [ops.base_anchors(s, scales, ratios) for s in strides]

    def forward(self, image_list: ImageList, feature_maps: List[torch.Tensor]) -> List[torch.Tensor]:
        device = feature_maps[0].device
        anchors = torch.cat([ops.grid_anchors(b, f.shape[-2:], s, device)
                             for b, f, s in zip(self.base, feature_maps, self.strides)])
        return [anchors for _ in range(len(image_list.image_sizes))]


class MMDetBoxCoder(BoxCoder):
    """mmdet ``DeltaXYWHBBoxCoder`` (means 0, ``stds``) behind torchvision's BoxCoder interface; decoding does
    not clip (the callers clip to each image's own size)."""

    def __init__(self, stds: Sequence[float]):
        super().__init__(weights=tuple(1.0 / s for s in stds))
        self.stds = tuple(stds)

    def encode_single(self, reference_boxes: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
        return ops.bbox2delta(proposals, reference_boxes, self.stds)

    def decode_single(self, rel_codes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return ops.delta2bbox(boxes.to(rel_codes.dtype), rel_codes, self.stds)


class MMDetRPN(RegionProposalNetwork):
    """torchvision's RPN (head, assigner, sampler, losses) with mmdet's proposal filtering: per level the
    ``nms_pre`` best by sigmoid score, decode clipped to the image, drop boxes of zero width or height,
    NMS 0.7 with levels kept apart, ``max_per_img`` best."""

    def __init__(self, in_channels: int, strides=STRIDES, pre_nms=(2000, 1000), post_nms=(1000, 1000)):
        generator = MMDetAnchorGenerator(strides)
        super().__init__(generator, RPNHead(in_channels, generator.num_anchors_per_location()[0]),
                         fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256, positive_fraction=0.5,
                         pre_nms_top_n=dict(training=pre_nms[0], testing=pre_nms[1]),
                         post_nms_top_n=dict(training=post_nms[0], testing=post_nms[1]), nms_thresh=0.7)
        self.box_coder = MMDetBoxCoder(RPN_STDS)

    def filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level):
        objectness = objectness.detach().view(proposals.shape[0], -1)
        boxes_out, scores_out = [], []
        for props, logits, shape in zip(proposals, objectness, image_shapes):
            sel_scores, sel_boxes, sel_levels = [], [], []
            per_level = zip(props.split(num_anchors_per_level), logits.split(num_anchors_per_level))
            for level, (b, s) in enumerate(per_level):
                s = s.sigmoid()
                if 0 < self.pre_nms_top_n() < s.shape[0]:
                    s, order = s.sort(descending=True)
                    s, b = s[:self.pre_nms_top_n()], b[order[:self.pre_nms_top_n()]]
                sel_scores.append(s)
                sel_boxes.append(b)
                sel_levels.append(torch.full_like(s, level, dtype=torch.long))
            scores, boxes, levels = torch.cat(sel_scores), torch.cat(sel_boxes).clone(), torch.cat(sel_levels)
            boxes[:, 0::2].clamp_(min=0, max=shape[1])
            boxes[:, 1::2].clamp_(min=0, max=shape[0])
            valid = (boxes[:, 2] - boxes[:, 0] > 0) & (boxes[:, 3] - boxes[:, 1] > 0)
            if not valid.all():
                boxes, scores, levels = boxes[valid], scores[valid], levels[valid]
            keep = ops.batched_nms(boxes, scores, levels, self.nms_thresh)[:self.post_nms_top_n()]
            boxes_out.append(boxes[keep])
            scores_out.append(scores[keep])
        return boxes_out, scores_out

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        """mmdet's RPN losses: sigmoid cross-entropy on the sampled anchors, L1 (not torchvision's smooth L1)
        on the positive deltas, both over the number of sampled anchors."""
        pos, neg = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(pos, dim=0))[0]
        neg = torch.where(torch.cat(neg, dim=0))[0]
        sampled = torch.cat([pos, neg], dim=0)
        labels = torch.cat(labels, dim=0)
        targets = torch.cat(regression_targets, dim=0)
        box_loss = F.l1_loss(pred_bbox_deltas[pos], targets[pos], reduction="sum") / max(sampled.numel(), 1)
        cls_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels[sampled])
        return cls_loss, box_loss

    def propose(self, images: ImageList, features: Dict[str, torch.Tensor]):
        """Test-time proposals and their scores (mmdet ``simple_test_rpn``), per image."""
        from torchvision.models.detection.rpn import concat_box_prediction_layers
        feats = list(features.values())
        objectness, deltas = self.head(feats)
        anchors = self.anchor_generator(images, feats)
        num_per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = self.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        return self.filter_proposals(proposals, objectness, images.image_sizes, num_per_level)


class MMDetRoIAlign(nn.Module):
    """mmdet ``SingleRoIExtractor``: RoIAlign (aligned, adaptive sampling) on the level of each RoI."""

    def __init__(self, output_size: int, featmap_names=("0", "1", "2", "3"), strides=STRIDES[:4]):
        super().__init__()
        self.output_size = output_size
        self.featmap_names = list(featmap_names)
        self.strides = tuple(strides)

    def forward(self, features: Dict[str, torch.Tensor], boxes: List[torch.Tensor], image_shapes=None):
        feats = [features[k] for k in self.featmap_names]
        return ops.multilevel_roi_align(feats, ops.boxes_to_rois(boxes), self.output_size, self.strides)


class MMDetBoxPredictor(nn.Module):
    """mmdet ``Shared2FCBBoxHead`` output layers: ``fc_cls`` (classes + background last), ``fc_reg``
    (4 deltas per class)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.fc_cls = nn.Linear(in_channels, num_classes + 1)
        self.fc_reg = nn.Linear(in_channels, num_classes * 4)
        nn.init.normal_(self.fc_cls.weight, std=0.01)
        nn.init.normal_(self.fc_reg.weight, std=0.001)
        nn.init.zeros_(self.fc_cls.bias)
        nn.init.zeros_(self.fc_reg.bias)

    def raw(self, x):
        x = x.flatten(1)
        return self.fc_cls(x), self.fc_reg(x)

    def forward(self, x):
        """torchvision layout (background first, background deltas zero) for torchvision's losses."""
        cls, reg = self.raw(x)
        return torch.cat([cls[:, -1:], cls[:, :-1]], 1), torch.cat([reg.new_zeros(reg.shape[0], 4), reg], 1)


class MMDetMaskPredictor(nn.Module):
    """mmdet ``FCNMaskHead`` after its convs: 2x2 deconv + ReLU, 1x1 logits (one per foreground class)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.upsample = nn.ConvTranspose2d(in_channels, in_channels, 2, stride=2)
        self.conv_logits = nn.Conv2d(in_channels, num_classes, 1)
        for m in (self.upsample, self.conv_logits):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)

    def raw(self, x):
        return self.conv_logits(F.relu(self.upsample(x)))

    def forward(self, x):
        logits = self.raw(x)
        return torch.cat([logits.new_zeros(logits.shape[0], 1, *logits.shape[2:]), logits], 1)


class MMDetRoIHeads(RoIHeads):
    """torchvision's RoI sampling with mmdet's losses for training; mmdet's ``StandardRoIHead.simple_test`` for
    inference."""

    def __init__(self, channels: int, num_classes: int, representation_size: int = 1024, mask_channels: int = 256,
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 100,
                 mask_thresh: float = 0.5):
        super().__init__(
            MMDetRoIAlign(7), TwoMLPHead(channels * 49, representation_size),
            MMDetBoxPredictor(representation_size, num_classes),
            fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=512, positive_fraction=0.25,
            bbox_reg_weights=None, score_thresh=score_thresh, nms_thresh=nms_thresh,
            detections_per_img=detections_per_img, mask_roi_pool=MMDetRoIAlign(14),
            mask_head=MaskRCNNHeads(channels, [mask_channels] * 4, 1),
            mask_predictor=MMDetMaskPredictor(mask_channels, num_classes))
        self.box_coder = MMDetBoxCoder(RCNN_STDS)
        self.mask_thresh = mask_thresh

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return self.simple_test(features, proposals, image_shapes), {}
        return [], self.losses(features, proposals, image_shapes, targets)

    def losses(self, features, proposals, image_shapes, targets) -> Dict[str, torch.Tensor]:
        """mmdet's R-CNN losses on torchvision's sampled RoIs (512 per image, a quarter positive, ground truth
        added as proposals): softmax cross-entropy with the background last, L1 on the positives' deltas of
        their class over the number of sampled RoIs, per-pixel sigmoid cross-entropy of the 28x28 masks."""
        from torchvision.models.detection.roi_heads import maskrcnn_loss
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        x = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        cls_score, bbox_pred = self.box_predictor.raw(x)
        num_classes = cls_score.shape[1] - 1
        tv_labels = torch.cat(labels)  # torchvision's: 0 background, 1..C
        pos = torch.where(tv_labels > 0)[0]
        mm_labels = torch.where(tv_labels > 0, tv_labels - 1, torch.full_like(tv_labels, num_classes))
        deltas = bbox_pred.view(-1, num_classes, 4)[pos, tv_labels[pos] - 1]
        loss_box = F.l1_loss(deltas, torch.cat(regression_targets)[pos], reduction="sum") / max(tv_labels.numel(), 1)
        positives = [torch.where(lab > 0)[0] for lab in labels]
        mask_boxes = [p[i] for p, i in zip(proposals, positives)]
        mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_boxes, image_shapes)))
        loss_mask = maskrcnn_loss(mask_logits, mask_boxes, [t["masks"] for t in targets],
                                  [t["labels"] for t in targets], [m[i] for m, i in zip(matched_idxs, positives)])
        return {"loss_classifier": F.cross_entropy(cls_score, mm_labels), "loss_box_reg": loss_box,
                "loss_mask": loss_mask}

    def simple_test(self, features, proposals: List[torch.Tensor], image_shapes: List[Tuple[int, int]],
                    scale_factors: Optional[List[torch.Tensor]] = None,
                    ori_shapes: Optional[List[Tuple[int, int]]] = None) -> List[Dict[str, torch.Tensor]]:
        """Detections in original-image pixels: boxes are decoded and clipped at the network's scale, divided
        by ``scale_factors`` (w, h, w, h) before NMS, and masks pasted at ``ori_shapes`` (mmdet ``rescale``)."""
        n_img = len(proposals)
        scale_factors = scale_factors or [None] * n_img
        ori_shapes = ori_shapes or list(image_shapes)
        rois = ops.boxes_to_rois(proposals)
        x = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        cls_score, bbox_pred = self.box_predictor.raw(x)
        counts = [len(p) for p in proposals]
        results = []
        for i, (r, c, d) in enumerate(zip(rois.split(counts), cls_score.split(counts), bbox_pred.split(counts))):
            scores = F.softmax(c, dim=-1)
            boxes = ops.delta2bbox(r[:, 1:], d, RCNN_STDS, max_shape=image_shapes[i])
            sf = scale_factors[i]
            if sf is not None and boxes.size(0) > 0:
                boxes = (boxes.view(boxes.size(0), -1, 4) / sf.to(boxes)).view(boxes.size(0), -1)
            dets, labels = ops.multiclass_nms(boxes, scores, self.score_thresh, self.nms_thresh,
                                              self.detections_per_img)
            results.append({"boxes": dets[:, :4], "scores": dets[:, 4], "labels": labels})
        if self.has_mask():
            self._add_masks(features, results, scale_factors, ori_shapes)
        return results

    def _add_masks(self, features, results, scale_factors, ori_shapes):
        net_boxes = [r["boxes"] * sf.to(r["boxes"]) if sf is not None else r["boxes"]
                     for r, sf in zip(results, scale_factors)]
        if sum(len(b) for b in net_boxes) == 0:
            for r, (h, w) in zip(results, ori_shapes):
                r["masks"] = torch.zeros(0, int(h), int(w), dtype=torch.bool, device=r["boxes"].device)
            return
        logits = self.mask_predictor.raw(self.mask_head(self.mask_roi_pool(features, net_boxes)))
        for r, b, lg, sf, (h, w) in zip(results, net_boxes, logits.split([len(b) for b in net_boxes]),
                                       scale_factors, ori_shapes):
            probs = lg.sigmoid()[torch.arange(len(b), device=lg.device), r["labels"]]
            paste_boxes = b / sf.to(b) if sf is not None else b
            r["masks"] = ops.paste_masks(probs, paste_boxes, int(h), int(w), self.mask_thresh)


class OverLoCKMaskRCNN(GeneralizedRCNN):
    """Mask R-CNN with an OverLoCK backbone, computing the official mmdetection 2.28 test-time function.

    ``model(images)`` (eval mode): list of CHW images (uint8 0-255, or float 0-1) -> per image a dict with
    ``boxes`` (x1, y1, x2, y2 in original pixels), ``scores``, ``labels`` (0-based indices into
    ``class_names``) and ``masks`` (bool, N x H x W). In training mode it takes torchvision-style targets
    (``boxes``, ``labels`` 1-based, ``masks``) and returns the loss dict.
    """

    def __init__(self, body: nn.Module, num_classes: int, class_names: Optional[Sequence[str]] = None,
                 fpn_channels: int = 256, representation_size: int = 1024, mask_channels: int = 256,
                 transform: Optional[MMDetTransform] = None):
        backbone = OverLoCKFPN(body, fpn_channels)
        super().__init__(backbone, MMDetRPN(fpn_channels),
                         MMDetRoIHeads(fpn_channels, num_classes, representation_size, mask_channels),
                         transform or MMDetTransform())
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [f"class_{i}" for i in range(num_classes)]
        self.config = dict(num_classes=num_classes, fpn_channels=fpn_channels,
                           representation_size=representation_size, mask_channels=mask_channels)

    def forward(self, images, targets=None):
        if self.training:
            return super().forward(images, targets)
        batch = self.transform(images)[0]
        return self._test(batch, batch.scale_factors, batch.original_sizes)

    @torch.no_grad()
    def predict_preprocessed(self, x: torch.Tensor, image_sizes: Sequence[Sequence[int]]):
        """Test path on an already resized, normalised, zero-padded batch (B, 3, H, W); ``image_sizes`` are
        the unpadded (h, w). Results are in those pixels."""
        sizes = [(int(h), int(w)) for h, w in image_sizes]
        return self._test(ImageList(x, sizes), None, sizes)

    def extract_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The five FPN levels (strides 4-64)."""
        return list(self.backbone(x).values())

    def _test(self, batch: ImageList, scale_factors, ori_shapes):
        features = self.backbone(batch.tensors)
        proposals, _ = self.rpn.propose(batch, features)
        return self.roi_heads.simple_test(features, proposals, batch.image_sizes, scale_factors, ori_shapes)
