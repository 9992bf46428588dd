"""UperNet + OverLoCK: the official ``upernet_overlock_{tiny,small,base}_ade20k_8xb2`` models.

``create_segmentation_model`` builds the segmentation-form dense backbone (``create_dense_backbone``), the
UperNet decode head on its four maps and the FCN auxiliary head on the stride-16 map, and loads

- an official mmseg checkpoint (``backbone.``, ``decode_head.``, ``auxiliary_head.``; ``meta`` ignored)
  strictly, or a checkpoint written by ``overlock train-seg``;
- or an ImageNet classification checkpoint: the backbone loads, the dense-only layers and both heads start
  fresh (listed in a warning).
"""
from __future__ import annotations

import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..models.dense import OverLoCKDense
from ..models.factory import TEST_CONFIG, create_dense_backbone
from ..models.overlock import MODEL_CONFIGS
from ..weights import CheckpointError, _strict_load, fit_state_dict, read_checkpoint, unwrap_state_dict
from .heads import FCNHead, UPerHead, resize

__all__ = ["OverLoCKUperNet", "create_segmentation_model", "load_segmentation_checkpoint",
           "SEGMENTATION_DEFAULTS", "checkpoint_class_names"]

# official drop path rates of the UperNet configs (T/S/B); XT has no official UperNet: we use T's rate
SEGMENTATION_DEFAULTS = {
    "overlock_xt": dict(drop_path_rate=0.2),
    "overlock_t": dict(drop_path_rate=0.2),
    "overlock_s": dict(drop_path_rate=0.3),
    "overlock_b": dict(drop_path_rate=0.5),
    "test_overlock": dict(drop_path_rate=0.0),
}


class OverLoCKUperNet(nn.Module):
    """Backbone + UperNet (+ FCN auxiliary head).

    ``model(x)`` returns the logits resized to the input size (mmseg's whole-image test path, before softmax);
    ``model.forward_train(x)`` returns ``(decode_logits, aux_logits)`` at the heads' resolutions (strides 4, 16)
    for the loss; ``aux_logits`` is None without an auxiliary head.
    """

    def __init__(self, backbone: nn.Module, num_classes: int = 150, channels: int = 512, aux_channels: int = 256,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), aux_in_index: int = 2, dropout: float = 0.1,
                 aux_head: bool = True, class_names: Optional[List[str]] = None):
        super().__init__()
        self.backbone = backbone
        in_channels = list(backbone.out_channels)
        self.num_classes = num_classes
        self.decode_head = UPerHead(in_channels, channels, num_classes, pool_scales, dropout)
        self.auxiliary_head = (FCNHead(in_channels[aux_in_index], aux_channels, num_classes, aux_in_index,
                                       dropout=dropout) if aux_head else None)
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.config = dict(num_classes=num_classes, channels=channels, aux_channels=aux_channels,
                           pool_scales=list(pool_scales), aux_in_index=aux_in_index, dropout=dropout,
                           aux_head=aux_head)

    def forward_train(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        feats = self.backbone(x)
        aux = self.auxiliary_head(feats) if self.auxiliary_head is not None else None
        return self.decode_head(feats), aux

    def forward(self, x: torch.Tensor, return_heads: bool = False):
        """Logits at the input size; ``return_heads=True``: ``forward_train``'s outputs (for DDP training)."""
        if return_heads:
            return self.forward_train(x)
        feats = self.backbone(x)
        return resize(self.decode_head(feats), x.shape[-2:])


def checkpoint_class_names(obj) -> Optional[List[str]]:
    """Class names stored in a checkpoint: mmseg ``meta.CLASSES`` or our ``class_names``."""
    if not isinstance(obj, dict):
        return None
    names = obj.get("class_names")
    if not names and isinstance(obj.get("meta"), dict):
        names = obj["meta"].get("CLASSES")
    return [str(n) for n in names] if names else None


def _checkpoint_classes(state: Dict[str, torch.Tensor]) -> Optional[int]:
    w = state.get("decode_head.conv_seg.weight")
    return int(w.shape[0]) if w is not None else None


def _fit_backbone(state: Dict[str, torch.Tensor], model: OverLoCKUperNet, source: str) -> Dict[str, torch.Tensor]:
    """``backbone.`` keys adapted to the backbone (e.g. merged dilated branches for a deploy-form model)."""
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    backbone = fit_state_dict(backbone, model.backbone, source, classifiers=())
    return {**{k: v for k, v in state.items() if not k.startswith("backbone.")},
            **{f"backbone.{k}": v for k, v in backbone.items()}}


def load_segmentation_checkpoint(model: OverLoCKUperNet, checkpoint, source: Optional[str] = None,
                                 fresh_classifier: bool = False) -> List[str]:
    """Load a segmentation (strict) or ImageNet classification (backbone only) checkpoint into ``model``.

    ``fresh_classifier``: a segmentation file with another class count loads all but the two final 1x1
    classifiers (fine-tuning, e.g. from ADE20K to your classes). Returns what was left fresh.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        source = source or os.fspath(checkpoint)
        obj = read_checkpoint(checkpoint)
    else:
        source, obj = source or "state dict", checkpoint
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and obj.get("format"):
        obj = obj["model"]  # an overlock training run state: the model weights
    state = unwrap_state_dict(obj, source, prefer_ema=False)
    if any(k.startswith("decode_head.") for k in state):
        n = _checkpoint_classes(state)
        if n is not None and n != model.num_classes and fresh_classifier:
            heads = ("decode_head.conv_seg.", "auxiliary_head.conv_seg.")
            state = {k: v for k, v in state.items() if not k.startswith(heads)}
            warnings.warn(f"{source}: {n} classes in the checkpoint, {model.num_classes} in the model: fresh "
                          "classifiers decode_head.conv_seg, auxiliary_head.conv_seg", stacklevel=2)
            if model.auxiliary_head is None:
                state = {k: v for k, v in state.items() if not k.startswith("auxiliary_head.")}
            _strict_load(model, _fit_backbone(state, model, source), source, allow_missing=heads)
            return [h.rstrip(".") for h in heads]
        if n is not None and n != model.num_classes:
            raise CheckpointError(f"{source}: the checkpoint segments {n} classes but the model was built for "
                                  f"{model.num_classes}; pass num_classes={n} (or fine-tune from the backbone only)")
        if model.auxiliary_head is None:
            state = {k: v for k, v in state.items() if not k.startswith("auxiliary_head.")}
        _strict_load(model, _fit_backbone(state, model, source), source)
        return []
    # an ImageNet classification checkpoint (or a bare/dense backbone file): backbone only, heads fresh
    from ..models.factory import load_dense_checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one warning below lists everything that starts fresh
        load_dense_checkpoint(model.backbone, state)
    fresh = [] if any(k.startswith(("extra_norm.", "backbone.extra_norm.")) for k in state) else ["backbone.extra_norm"]
    fresh += ["decode_head"] + (["auxiliary_head"] if model.auxiliary_head is not None else [])
    warnings.warn(f"{source}: backbone weights loaded; initialised fresh: {', '.join(fresh)}", stacklevel=2)
    return fresh


def dense_backbone(name: str, kind: str = "segmentation", checkpoint=None, **kwargs) -> OverLoCKDense:
    """``create_dense_backbone``, plus ``test_overlock`` (the tiny test configuration) for fast tests."""
    if name != "test_overlock":
        return create_dense_backbone(name, kind=kind, checkpoint=checkpoint, **kwargs)
    model = OverLoCKDense(kind=kind, **{**TEST_CONFIG, **kwargs})
    if checkpoint is not None:
        from ..models.factory import load_dense_checkpoint
        load_dense_checkpoint(model, checkpoint)
    return model


def create_segmentation_model(name: str = "overlock_t", num_classes: int = 150, checkpoint=None, *,
                              channels: int = 512, aux_channels: int = 256, pool_scales: Sequence[int] = (1, 2, 3, 6),
                              aux_head: bool = True, aux_in_index: int = 2, dropout: float = 0.1,
                              class_names: Optional[List[str]] = None, **backbone_kwargs) -> OverLoCKUperNet:
    """The official UperNet-OverLoCK (``name``: ``overlock_{xt,t,s,b}``; ``test_overlock`` for tests).

    Defaults are those of the official ADE20K configs (150 classes, 512 decode channels, 256 auxiliary
    channels on level 2, pool scales 1/2/3/6, dropout 0.1, drop path 0.2/0.3/0.5 for T/S/B; pass
    ``drop_path_rate`` to change it). ``backbone_kwargs`` go to the OverLoCK constructor. ``checkpoint``: a path
    or a state dict; see :func:`load_segmentation_checkpoint`. Class names come from ``class_names``, else from
    the checkpoint (mmseg ``meta.CLASSES``), else the 150 ADE20K names when ``num_classes`` is 150.
    """
    base = name[:-len("_reparam")] if name.endswith("_reparam") else name
    if base not in MODEL_CONFIGS and base != "test_overlock":
        raise ValueError(f"unknown OverLoCK variant {name!r}; choose one of {', '.join(MODEL_CONFIGS)}")
    kwargs = dict(SEGMENTATION_DEFAULTS.get(base, {}))
    kwargs.update(backbone_kwargs)
    backbone = dense_backbone(name, kind="segmentation", **kwargs)
    obj = None
    if checkpoint is not None and isinstance(checkpoint, (str, os.PathLike)):
        obj = read_checkpoint(checkpoint)
    elif checkpoint is not None:
        obj = checkpoint
    if class_names is None and obj is not None:
        class_names = checkpoint_class_names(obj)
    if class_names is None and num_classes == 150:
        from .ade20k import ADE20K_CLASSES
        class_names = list(ADE20K_CLASSES)
    if class_names is not None and len(class_names) != num_classes:
        class_names = None
    model = OverLoCKUperNet(backbone, num_classes, channels, aux_channels, pool_scales, aux_in_index=aux_in_index,
                            dropout=dropout, aux_head=aux_head, class_names=class_names)
    if obj is not None:
        source = os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "state dict"
        load_segmentation_checkpoint(model, obj, source)
    return model


def _infer_variant(state: Dict[str, torch.Tensor]) -> Optional[str]:
    """The OverLoCK variant whose widths and depths match a state dict's ``backbone.`` keys."""
    def width(i):
        w = state.get(f"backbone.patch_embed{i}.0.weight") if i == 1 else None
        if i > 1:
            w = next((v for k, v in state.items() if k.startswith(f"backbone.blocks{i}.0.") and
                      k.endswith("dwconv.weight")), None)
        return None if w is None else int(w.shape[0])

    def depth(prefix):
        idx = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
        return max(idx) + 1 if idx else 0

    found = ([depth(f"backbone.blocks{i}.") for i in (1, 2, 3, 4)],
             [depth("backbone.sub_blocks3."), depth("backbone.sub_blocks4.")])
    candidates = {**MODEL_CONFIGS, "test_overlock": TEST_CONFIG}
    for name, cfg in candidates.items():
        if ([cfg["depth"][0], cfg["depth"][1], cfg["depth"][2], cfg["depth"][3]], list(cfg["sub_depth"])) == \
                (found[0], found[1]) and width(2) in (None, cfg["embed_dim"][1]):
            return name
    return None


def model_from_checkpoint(path: str, model: Optional[str] = None, **overrides) -> OverLoCKUperNet:
    """A segmentation model built and loaded from one file: an ``overlock train-seg`` checkpoint (it names its
    model and head) or an official mmseg UperNet file (variant, classes and head widths read from its keys;
    ``model`` overrides the variant)."""
    obj = read_checkpoint(path)
    if isinstance(obj, dict) and isinstance(obj.get("seg_model"), dict):
        cfg = dict(obj["seg_model"])
        name = model or cfg.pop("model")
        cfg.pop("model", None)
        backbone = cfg.pop("backbone", {}) or {}
        cfg.update(overrides)
        return create_segmentation_model(name, checkpoint=obj["model"] if "model" in obj else obj,
                                         class_names=obj.get("class_names"), **backbone, **cfg)
    state = unwrap_state_dict(obj, path, prefer_ema=False)
    if "decode_head.conv_seg.weight" not in state:
        raise CheckpointError(f"{path}: not a segmentation checkpoint (no 'decode_head.conv_seg.weight'); expected "
                              "an official UperNet file or a checkpoint written by 'overlock train-seg'")
    name = model or _infer_variant(state)
    if name is None:
        raise CheckpointError(f"{path}: could not tell the OverLoCK variant from its keys; pass --model "
                              "overlock_{xt,t,s,b}")
    w = state["decode_head.conv_seg.weight"]
    aux = state.get("auxiliary_head.conv_seg.weight")
    pools = sorted({int(k.split(".")[2]) for k in state if k.startswith("decode_head.psp_modules.")})
    cfg = dict(num_classes=int(w.shape[0]), channels=int(w.shape[1]), aux_head=aux is not None,
               aux_channels=int(aux.shape[1]) if aux is not None else 256,
               pool_scales=(1, 2, 3, 6),
               class_names=checkpoint_class_names(obj))
    if len(pools) != 4:
        raise CheckpointError(f"{path}: {len(pools)} pyramid pooling branches; the official UperNet has 4 (scales 1, "
                              "2, 3, 6) and other scales cannot be read from the weights")
    cfg.update(overrides)
    return create_segmentation_model(name, checkpoint=obj, **cfg)
