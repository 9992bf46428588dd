"""``create_detection_model`` and checkpoint loading: official mmdet files, our own files, ImageNet backbones.

mmdet -> ours is one table of key renames (``MMDET_KEY_MAP``); parameter layouts are kept as mmdet's (see
model.py), so an official file loads 1:1 and strictly: every key used, every parameter filled.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Dict, Optional, Sequence

import torch

from ..models.factory import create_dense_backbone, load_dense_checkpoint
from ..weights import CheckpointError, _strict_load, fit_state_dict, read_checkpoint, unwrap_state_dict
from .model import OverLoCKMaskRCNN
from .transform import MMDetTransform

__all__ = ["create_detection_model", "load_detection_checkpoint", "MMDET_KEY_MAP", "map_mmdet_keys",
           "COCO_CLASSES", "DROP_PATH"]

# official drop-path rates of the detection recipes
DROP_PATH = {"overlock_xt": 0.1, "overlock_t": 0.2, "overlock_s": 0.4, "overlock_b": 0.6}

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush")

MMDET_KEY_MAP = (
    (r"^backbone\.", "backbone.body."),
    (r"^neck\.lateral_convs\.(\d+)\.conv\.", r"backbone.fpn.inner_blocks.\1.0."),
    (r"^neck\.fpn_convs\.(\d+)\.conv\.", r"backbone.fpn.layer_blocks.\1.0."),
    (r"^rpn_head\.rpn_conv\.", "rpn.head.conv.0.0."),
    (r"^rpn_head\.rpn_cls\.", "rpn.head.cls_logits."),
    (r"^rpn_head\.rpn_reg\.", "rpn.head.bbox_pred."),
    (r"^roi_head\.bbox_head\.shared_fcs\.0\.", "roi_heads.box_head.fc6."),
    (r"^roi_head\.bbox_head\.shared_fcs\.1\.", "roi_heads.box_head.fc7."),
    (r"^roi_head\.bbox_head\.(fc_cls|fc_reg)\.", r"roi_heads.box_predictor.\1."),
    (r"^roi_head\.mask_head\.convs\.(\d+)\.conv\.", r"roi_heads.mask_head.\1.0."),
    (r"^roi_head\.mask_head\.(upsample|conv_logits)\.", r"roi_heads.mask_predictor.\1."),
)
_COMPILED = [(re.compile(p), r) for p, r in MMDET_KEY_MAP]
CLASSIFIERS = ("roi_heads.box_predictor.fc_cls.", "roi_heads.box_predictor.fc_reg.",
               "roi_heads.mask_predictor.conv_logits.")


def map_mmdet_keys(state: Dict[str, torch.Tensor], source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """Rename an mmdet Mask R-CNN state dict to ours; keys the map does not know are an error."""
    out, unknown = {}, []
    for key, value in state.items():
        for pattern, repl in _COMPILED:
            if pattern.match(key):
                out[pattern.sub(repl, key, count=1)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{source}: keys that are not part of the official Mask R-CNN: "
                              f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}")
    return out


def _checkpoint_info(obj) -> dict:
    """Class names and model settings stored with a checkpoint (mmdet ``meta.CLASSES`` or ours)."""
    info = {}
    if isinstance(obj, dict):
        meta = obj.get("meta")
        if isinstance(meta, dict) and meta.get("CLASSES"):
            info["class_names"] = list(meta["CLASSES"])
        if obj.get("class_names"):
            info["class_names"] = list(obj["class_names"])
        if isinstance(obj.get("detection_config"), dict):
            info["config"] = dict(obj["detection_config"])
    return info


def _layout(state) -> str:
    if any(k.startswith(("neck.", "rpn_head.", "roi_head.")) for k in state):
        return "mmdet"
    if any(k.startswith("backbone.body.") for k in state):
        return "ours"
    return "backbone"


def load_detection_checkpoint(model: OverLoCKMaskRCNN, checkpoint, source: Optional[str] = None) -> OverLoCKMaskRCNN:
    """Load an official mmdet Mask R-CNN file, one of ours, or a backbone (ImageNet classification / dense)
    checkpoint. Whole-detector files load strictly; with another class count the class-specific layers
    start fresh (warned). A backbone checkpoint leaves neck and heads fresh (warned)."""
    if isinstance(checkpoint, (str, os.PathLike)):
        source = source or os.fspath(checkpoint)
        obj = read_checkpoint(checkpoint)
    else:
        source, obj = source or "state dict", checkpoint
    state = unwrap_state_dict(obj, source, prefer_ema=False)
    layout = _layout(state)
    if layout == "backbone":
        load_dense_checkpoint(model.backbone.body, {"state_dict": state})
        warnings.warn(f"{source}: backbone-only checkpoint; the FPN, RPN and RoI heads start fresh", stacklevel=2)
        return model
    if layout == "mmdet":
        state = map_mmdet_keys(state, source)
    body = {k[len("backbone.body."):]: v for k, v in state.items() if k.startswith("backbone.body.")}
    body = fit_state_dict(body, model.backbone.body, source, classifiers=())
    state = {**{k: v for k, v in state.items() if not k.startswith("backbone.body.")},
             **{f"backbone.body.{k}": v for k, v in body.items()}}
    expected = model.state_dict()
    fresh = []
    for prefix in CLASSIFIERS:
        wkey = prefix + "weight"
        if wkey in state and wkey in expected and state[wkey].shape != expected[wkey].shape:
            fresh.append(prefix)
            state.pop(wkey)
            state.pop(prefix + "bias", None)
    if fresh:
        warnings.warn(f"{source}: the checkpoint has another class count; fresh class-specific layers for "
                      f"fine-tuning: {', '.join(p.rstrip('.') for p in fresh)}", stacklevel=2)
    _strict_load(model, state, source, allow_missing=tuple(fresh))
    return model


def create_detection_model(name: str = "overlock_t", num_classes: Optional[int] = None,
                           checkpoint: Optional[str] = None, *, class_names: Optional[Sequence[str]] = None,
                           fpn_channels: int = 256, representation_size: int = 1024, mask_channels: int = 256,
                           drop_path_rate: Optional[float] = None, test_scale=None, train_scales=None,
                           crop_aug: bool = False, backbone_args: Optional[dict] = None) -> OverLoCKMaskRCNN:
    """The official Mask R-CNN + OverLoCK (``name`` = overlock_{xt,t,s,b}[_reparam]).

    ``checkpoint``: an official mmdet file (``mask_rcnn_overlock_*_coco*.pth``), one saved by ``overlock``
    detection training, or an ImageNet classification checkpoint (backbone only). ``num_classes`` and
    ``class_names`` default to the checkpoint's (80 COCO classes for official files); ``test_scale`` (long,
    short) to the checkpoint's, else mmdet's (1333, 800). ``backbone_args``
    override the backbone configuration (e.g. the tiny test model's widths)."""
    obj, info = None, {}
    if checkpoint is not None:
        obj = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
        info = _checkpoint_info(obj)
        cfg = info.get("config", {})
        fpn_channels = cfg.get("fpn_channels", fpn_channels)
        representation_size = cfg.get("representation_size", representation_size)
        mask_channels = cfg.get("mask_channels", mask_channels)
        if test_scale is None and cfg.get("test_scale"):
            test_scale = tuple(cfg["test_scale"])
        backbone_args = backbone_args if backbone_args is not None else cfg.get("backbone_args")
        if num_classes is None:
            state = unwrap_state_dict(obj, os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike))
                                      else "state dict", prefer_ema=False)
            for key in ("roi_head.bbox_head.fc_cls.weight", "roi_heads.box_predictor.fc_cls.weight"):
                if key in state:
                    num_classes = state[key].shape[0] - 1
        if class_names is None and info.get("class_names") and (num_classes is None
                                                               or len(info["class_names"]) == num_classes):
            class_names = info["class_names"]
    if num_classes is None:
        num_classes = len(class_names) if class_names else 80
    if class_names is None and num_classes == 80:
        class_names = COCO_CLASSES
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names given for {num_classes} classes")
    base = name[:-len("_reparam")] if name.endswith("_reparam") else name
    args = dict(backbone_args or {})
    args.setdefault("drop_path_rate", drop_path_rate if drop_path_rate is not None else DROP_PATH.get(base, 0.0))
    if base == "test_overlock":  # the project's tiny test configuration (fast tests and smoke runs)
        from ..models.factory import TEST_CONFIG
        args = {**TEST_CONFIG, **args}
        body = create_dense_backbone("overlock_xt", kind="detection", **args)
    else:
        body = create_dense_backbone(name, kind="detection", **args)
    model = OverLoCKMaskRCNN(body, num_classes, class_names, fpn_channels, representation_size, mask_channels,
                             transform=MMDetTransform(tuple(test_scale or (1333, 800)), train_scales,
                                                      crop_aug=crop_aug))
    model.config.update(name=name, backbone_args=dict(backbone_args or {}),
                        test_scale=list(model.transform.test_scale))
    if obj is not None:
        load_detection_checkpoint(model, obj, source=os.fspath(checkpoint) if isinstance(
            checkpoint, (str, os.PathLike)) else None)
    return model.eval()


def infer_variant(checkpoint) -> str:
    """The backbone variant of a detection checkpoint: stored with ours, else read from the FPN's input
    widths (official files name no variant)."""
    from ..models.overlock import MODEL_CONFIGS
    obj = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    cfg = _checkpoint_info(obj).get("config", {})
    if cfg.get("name"):
        return cfg["name"]
    if isinstance(obj, dict) and isinstance(obj.get("args"), dict) and obj["args"].get("model"):
        return obj["args"]["model"]
    state = unwrap_state_dict(obj, str(checkpoint), prefer_ema=False)
    widths = []
    for i in range(4):
        for key in (f"neck.lateral_convs.{i}.conv.weight", f"backbone.fpn.inner_blocks.{i}.0.weight"):
            if key in state:
                widths.append(int(state[key].shape[1]))
    for name, c in MODEL_CONFIGS.items():
        e = c["embed_dim"]
        if widths == [e[0], e[1], e[2] + e[3] // 4, e[3] + e[3] // 4]:
            return name
    raise CheckpointError(f"{checkpoint}: cannot tell the OverLoCK variant from the FPN input widths {widths}; "
                          "pass --model")


def detection_checkpoint(model: OverLoCKMaskRCNN, category_ids: Optional[Sequence[int]] = None) -> dict:
    """A self-describing weights file: state dict, class names, category ids and model settings (readable
    with ``torch.load(weights_only=True)``; ``create_detection_model(checkpoint=...)`` rebuilds the model)."""
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.items()}
    return {"format": "overlock-detection-v1", "state_dict": model.state_dict(),
            "class_names": list(model.class_names), "category_ids": list(category_ids or []),
            "detection_config": cfg}
