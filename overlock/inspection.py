"""What a checkpoint file holds, found from its bytes and keys alone (no model is run).

``inspect_checkpoint(path)`` checks the container (PyTorch zip, legacy pickle, safetensors) byte by byte, reads it
weights-only, finds the wrapper (raw, ``state_dict``, ``model``, ``state_dict_ema``/``model_ema``, an overlock run
checkpoint, an mmdet/mmseg file), the task (classification, detection, segmentation, or a bare dense backbone),
and compares the keys and shapes with every OverLoCK variant in training and deploy form to name the nearest one
and the keys that differ. The reference layouts come from the project's own models built on the meta device, so
they cost no memory and follow the code.

Named ``inspection`` so that it does not shadow the standard library's ``inspect``.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
import zipfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from .weights import CheckpointError, read_checkpoint

__all__ = ["CheckpointInfo", "inspect_checkpoint", "check_container", "select_state", "reference_layout",
           "sha256_file", "TASKS"]

TASKS = ("classification", "detection", "segmentation")
CLASSIFIERS = ("head.4.", "aux_head.2.")
BUFFER_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")
# top-level key prefixes of the official mmdet (Mask R-CNN) and mmseg (UperNet) checkpoints besides ``backbone.``
DENSE_HEADS = {"detection": ("neck.", "rpn_head.", "roi_head."),
               "segmentation": ("decode_head.", "auxiliary_head.")}
BACKBONE_MARKERS = ("patch_embed1.", "blocks1.", "patch_embed4.", "sub_blocks3.", "high_level_proj.")


def _bn(prefix: str) -> List[str]:
    return [f"{prefix}.{p}" for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def _conv_module(prefix: str, bias: bool = False, norm: bool = True) -> List[str]:
    keys = [f"{prefix}.conv.weight"] + ([f"{prefix}.conv.bias"] if bias else [])
    return keys + (_bn(f"{prefix}.bn") if norm else [])


def _head_keys(task: str) -> List[str]:
    """Key names (not shapes: those depend on the variant and class count) of the official dense heads."""
    if task == "segmentation":  # mmseg 0.30 UPerHead + FCNHead, as in upernet_overlock_*_ade20k
        keys = ["decode_head.conv_seg.weight", "decode_head.conv_seg.bias"]
        for i in range(4):
            keys += _conv_module(f"decode_head.psp_modules.{i}.1")
        keys += _conv_module("decode_head.bottleneck")
        for i in range(3):
            keys += _conv_module(f"decode_head.lateral_convs.{i}")
        for i in range(3):
            keys += _conv_module(f"decode_head.fpn_convs.{i}")
        keys += _conv_module("decode_head.fpn_bottleneck")
        keys += ["auxiliary_head.conv_seg.weight", "auxiliary_head.conv_seg.bias"]
        keys += _conv_module("auxiliary_head.convs.0")
        return keys
    # mmdet 2.28 Mask R-CNN with FPN, as in mask_rcnn_overlock_*_in1k_fpn_coco
    keys = []
    for kind in ("lateral_convs", "fpn_convs"):
        for i in range(4):
            keys += _conv_module(f"neck.{kind}.{i}", bias=True, norm=False)
    for name in ("rpn_conv", "rpn_cls", "rpn_reg"):
        keys += [f"rpn_head.{name}.weight", f"rpn_head.{name}.bias"]
    for name in ("fc_cls", "fc_reg", "shared_fcs.0", "shared_fcs.1"):
        keys += [f"roi_head.bbox_head.{name}.weight", f"roi_head.bbox_head.{name}.bias"]
    for name in ("convs.0.conv", "convs.1.conv", "convs.2.conv", "convs.3.conv", "upsample", "conv_logits"):
        keys += [f"roi_head.mask_head.{name}.weight", f"roi_head.mask_head.{name}.bias"]
    return keys


# ----------------------------------------------------------------------------------------------- bytes

def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def check_container(path: str) -> str:
    """The container format of ``path`` after checking its bytes; raises ``CheckpointError`` naming what is wrong.

    Returns ``"pytorch-zip"``, ``"pytorch-legacy"`` or ``"safetensors"``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
                names = z.namelist()
                end = max((i.header_offset + len(i.FileHeader()) + i.compress_size for i in z.infolist()),
                          default=0)
        except zipfile.BadZipFile as e:
            raise CheckpointError(
                f"{path}: truncated or corrupt PyTorch file: its {size} bytes begin as a zip archive ('PK\\x03\\x04' "
                "at byte 0) but end without the zip end-of-central-directory record that closes every complete "
                f"PyTorch file (zipfile: {e}). The file was probably cut short: download or copy it again.") from e
        except (OSError, EOFError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt PyTorch zip archive ({size} bytes): {e}") from e
        if bad is not None:
            raise CheckpointError(f"{path}: corrupt PyTorch file: the bytes of archive member '{bad}' fail their "
                                  "CRC-32 check. Download or copy it again.")
        if not any(n.endswith("data.pkl") for n in names):
            raise CheckpointError(f"{path}: a zip archive ({size} bytes) but not a PyTorch checkpoint: no "
                                  f"'data.pkl' member (members: {', '.join(names[:5])})")
        if end > size:
            raise CheckpointError(f"{path}: truncated: archive data runs to byte {end} but the file has {size}")
        return "pytorch-zip"
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:  # a pickle protocol 2-5 opcode: torch's pre-1.6 format
        return "pytorch-legacy"
    if size >= 8:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= size - 8 and head[8:9] == b"{":
            with open(path, "rb") as f:
                f.seek(8)
                raw = f.read(n)
            try:
                header = json.loads(raw)
            except ValueError as e:
                raise CheckpointError(f"{path}: corrupt safetensors header (bytes 8-{8 + n}): {e}") from e
            ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
            data_end = 8 + n + max(ends, default=0)
            if data_end > size:
                worst = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
                raise CheckpointError(
                    f"{path}: truncated safetensors file: the header says tensor data runs to byte {data_end} "
                    f"(last tensor '{worst}') but the file has {size} bytes ({data_end - size} missing)")
            return "safetensors"
        if 2 <= n and head[8:9] == b"{":
            raise CheckpointError(f"{path}: truncated safetensors file: bytes 0-7 announce a {n}-byte header but "
                                  f"the file has only {size} bytes")
    raise CheckpointError(f"{path}: not a checkpoint file: its first bytes {head[:8]!r} are neither a PyTorch zip "
                          "archive ('PK\\x03\\x04'), a pickle, nor a safetensors header")


def resolve_path(path_or_release: str | os.PathLike) -> str:
    """A local file, or an official release file name (``overlock_t_in1k_224.pth``,
    ``upernet_overlock_tiny_ade20k.pth``, ...) downloaded to the cache directory on first use."""
    path = os.fspath(path_or_release)
    if os.path.exists(path):
        return path
    from .models.factory import download_release, release_files
    if os.path.basename(path) == path and path in release_files():
        return download_release(path)
    return path


def safetensors_metadata(path: str) -> Dict[str, str]:
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {})


# ----------------------------------------------------------------------------------------------- wrappers

def _tensors(obj) -> Dict[str, torch.Tensor]:
    return {k[7:] if k.startswith("module.") else k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def select_state(obj, source: str, ema: Optional[bool] = None) -> Tuple[Dict[str, torch.Tensor], str, bool]:
    """The state dict inside a loaded checkpoint: ``(state, wrapper key, has_ema)``.

    ``ema=None`` takes the EMA weights when present (timm's choice), ``True`` requires them, ``False`` refuses them.
    """
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: expected a dict of tensors, found {type(obj).__name__}")
    ema_keys = [k for k in ("state_dict_ema", "model_ema") if isinstance(obj.get(k), dict) and obj[k]]
    plain_keys = [k for k in ("state_dict", "model") if isinstance(obj.get(k), dict) and obj[k]]
    has_ema = bool(ema_keys)
    if ema and not has_ema:
        raise CheckpointError(f"{source}: no EMA weights in this file (looked for 'state_dict_ema' and 'model_ema'; "
                              f"top-level keys: {', '.join(map(str, list(obj)[:10]))}); drop --ema")
    if ema is not False and has_ema:
        key = ema_keys[0]
    elif plain_keys:
        key = plain_keys[0]
    elif ema is False and has_ema:
        raise CheckpointError(f"{source}: only EMA weights in this file ('{ema_keys[0]}'); drop --no-ema")
    else:
        key = ""
    state = _tensors(obj[key] if key else obj)
    if not state:
        raise CheckpointError(f"{source}: no tensors found (looked for a raw state dict and under 'state_dict', "
                              f"'model', 'state_dict_ema', 'model_ema'; top-level keys: "
                              f"{', '.join(map(str, list(obj)[:10]))})")
    return state, key, has_ema


# ----------------------------------------------------------------------------------------------- layouts

def _variants() -> Tuple[str, ...]:
    from .models import VARIANTS
    return tuple(VARIANTS) + ("test_overlock",)


def variant_config(variant: str) -> dict:
    """Constructor arguments of a variant name (``overlock_t``, ..., and the tiny ``test_overlock``)."""
    from .models import MODEL_CONFIGS
    from .models.factory import TEST_CONFIG
    if variant == "test_overlock":
        return dict(TEST_CONFIG)
    if variant not in MODEL_CONFIGS:
        raise ValueError(f"unknown OverLoCK variant {variant!r}; choose one of {', '.join(_variants())}")
    return dict(MODEL_CONFIGS[variant])


@functools.lru_cache(maxsize=None)
def reference_layout(variant: str, task: str, deploy: bool) -> Dict[str, Tuple[int, ...]]:
    """Keys and shapes of the project's model (with the auxiliary head for classification), built on 'meta'."""
    from .models import OverLoCK, OverLoCKDense
    args = dict(variant_config(variant), deploy=deploy)
    with torch.device("meta"):
        model = OverLoCK(use_ds=True, **args) if task == "classification" else OverLoCKDense(kind=task, **args)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def detect_task(state: Dict[str, torch.Tensor]) -> Tuple[str, str]:
    """``(task, prefix)``: the task of the weights and the prefix of the backbone keys ('' or 'backbone.')."""
    keys = list(state)
    prefix = "backbone." if any(k.startswith("backbone.") for k in keys) else ""
    if prefix or any(k.startswith("extra_norm.") for k in keys):
        # only the detection backbone has ``h_proj`` (the context prior added to the stride-32 map)
        return ("detection" if f"{prefix}h_proj.0.weight" in state else "segmentation"), prefix
    return "classification", ""


@dataclass
class CheckpointInfo:
    """What :func:`inspect_checkpoint` found; ``str(info)`` is the report ``overlock inspect`` prints."""
    path: str
    size: int
    container: str
    wrapper: str
    task: str
    variant: str
    form: str
    num_classes: Optional[int]
    class_names: Optional[List[str]]
    has_ema: bool
    has_aux_head: bool
    num_params: int
    num_tensors: int
    matched: int
    reference_keys: int
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[str] = field(default_factory=list)
    head_keys: int = 0
    head_missing: List[str] = field(default_factory=list)
    other_keys: List[str] = field(default_factory=list)
    metadata: Dict[str, str] = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        """True when the backbone (and classification heads) fit the variant key for key and shape for shape.

        Keys beside the backbone of a dense checkpoint (necks, heads) are reported, not judged."""
        return not (self.missing or self.unexpected or self.mismatched)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["exact"] = self.exact
        return d

    def __str__(self) -> str:
        def few(items, n=10):
            return ", ".join(items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")
        model = model_name(self.variant, self.form == "deploy")
        if self.task == "classification":
            loads = (f"dilated branches merged: load into {model}" if self.form == "deploy" else
                     f"loads into {self.variant} and {model_name(self.variant, True)} (merged on load)")
        else:
            name = "'overlock_t', **TEST_CONFIG" if self.variant == "test_overlock" else repr(self.variant)
            loads = (f"create_dense_backbone({name}, kind={self.task!r}, checkpoint=...)"
                     + (", deploy form" if self.form == "deploy" else ""))
        lines = [
            f"file:        {self.path} ({self.size / 1e6:.1f} MB)",
            f"format:      {self.container}, weights under {self.wrapper or '(top level: a raw state dict)'}",
            f"task:        {self.task}",
            f"variant:     {self.variant} ({'exact match' if self.exact else 'nearest match'}: {self.matched} of "
            f"{self.reference_keys} reference keys with equal shapes)",
            f"form:        {self.form} ({loads})",
        ]
        if self.task == "classification":
            aux = "yes (deep supervision; kept with use_ds=True)" if self.has_aux_head else "no"
            lines.append(f"aux head:    {aux}")
        if self.num_classes is not None:
            names = f": {few(self.class_names, 8)}" if self.class_names else " (names not stored)"
            lines.append(f"classes:     {self.num_classes}{names}")
        lines.append(f"EMA weights: {'present' if self.has_ema else 'no'}"
                     + (f" (described here: '{self.wrapper}'; `convert --no-ema` takes the raw ones)"
                        if self.has_ema and self.wrapper in ("state_dict_ema", "model_ema") else ""))
        lines.append(f"parameters:  {self.num_params:,} ({self.num_params / 1e6:.2f} M) in {self.num_tensors} tensors")
        if self.head_keys:
            heads = ", ".join(p.rstrip(".") for p in DENSE_HEADS[self.task])
            lines.append(f"dense heads: {self.head_keys} keys ({heads})"
                         + (f"; missing against the official layout: {few(self.head_missing)}"
                            if self.head_missing else ""))
        if self.other_keys:
            lines.append(f"other keys:  {few(self.other_keys)} (neither backbone nor a known {self.task} head)")
        if self.metadata:
            shown = {k: (v if len(v) < 80 else v[:77] + "...") for k, v in self.metadata.items()}
            lines.append("metadata:    " + "; ".join(f"{k}={v}" for k, v in sorted(shown.items())))
        if self.exact:
            lines.append(f"keys:        all match {model}")
        else:
            lines.append(f"keys against {model}:")
            lines.append(f"  missing ({len(self.missing)}): {few(self.missing) or '-'}")
            lines.append(f"  unexpected ({len(self.unexpected)}): {few(self.unexpected) or '-'}")
            lines.append(f"  shape mismatches ({len(self.mismatched)}): {few(self.mismatched) or '-'}")
        return "\n".join(lines)


def model_name(variant: str, deploy: bool) -> str:
    """The timm name of a variant's form (the tiny test model has no registered ``_reparam`` name)."""
    if not deploy:
        return variant
    return "test_overlock(deploy=True)" if variant == "test_overlock" else f"{variant}_reparam"


def _is_param(key: str) -> bool:
    return not key.endswith(BUFFER_SUFFIXES)


def _compare(backbone: Dict[str, torch.Tensor], ref: Dict[str, Tuple[int, ...]], has_aux: bool):
    matched, missing, mismatched = 0, [], []
    for k, shape in ref.items():
        if k.startswith("aux_head.") and not has_aux:
            continue  # a file without deep-supervision head is a complete project/official form
        if k not in backbone:
            missing.append(k)
        elif k.startswith(CLASSIFIERS) and tuple(backbone[k].shape)[1:] == shape[1:]:
            matched += 1  # the class count is free
        elif tuple(backbone[k].shape) == shape:
            matched += 1
        else:
            mismatched.append(f"{k}: file {tuple(backbone[k].shape)} vs {shape}")
    unexpected = [k for k in backbone if k not in ref]
    return matched, missing, unexpected, mismatched


def _depths(keys) -> Tuple[int, ...]:
    """Blocks per stage (blocks1-4, sub_blocks3-4) as seen in the keys."""
    out = []
    for stage in ("blocks1.", "blocks2.", "blocks3.", "blocks4.", "sub_blocks3.", "sub_blocks4."):
        out.append(len({k[len(stage):].split(".", 1)[0] for k in keys if k.startswith(stage)}))
    return tuple(out)


def _candidates(backbone) -> List[str]:
    """Variants whose block counts equal the file's (all of them when none does), to build few layouts."""
    found = _depths(backbone)
    same = [v for v in _variants()
            if tuple(variant_config(v)["depth"]) + tuple(variant_config(v)["sub_depth"]) == found]
    return same or list(_variants())


def match_variant(backbone: Dict[str, torch.Tensor], task: str, source: str):
    """The nearest (variant, deploy, comparison) over every variant and form; raises if nothing is close."""
    has_aux = any(k.startswith("aux_head.") for k in backbone)
    deploy_hint = any(k.endswith(".lk_origin.bias") for k in backbone)
    best = None

    def search(variants, forms):
        nonlocal best
        for variant in variants:
            for deploy in forms:
                ref = reference_layout(variant, task, deploy)
                matched, missing, unexpected, mismatched = _compare(backbone, ref, has_aux)
                n_ref = sum(1 for k in ref if has_aux or not k.startswith("aux_head."))
                score = (matched - len(mismatched) - len(unexpected) - len(missing), deploy == deploy_hint)
                if best is None or score > best[0]:
                    best = (score, variant, deploy, n_ref, matched, missing, unexpected, mismatched)

    # the likely variant and form first (block counts, merged-branch bias); everything else only if it is not exact
    search(_candidates(backbone), (deploy_hint,))
    if best[0][0] < best[4]:
        search(_variants(), (False, True))
    _, variant, deploy, n_ref, matched, missing, unexpected, mismatched = best
    if matched < 0.5 * n_ref:
        found = [k for k in backbone if not any(k.startswith(m) for m in BACKBONE_MARKERS)][:8]
        hint = ("none of the OverLoCK keys (" + ", ".join(m + "*" for m in BACKBONE_MARKERS) + ") are present"
                if not any(k.startswith(BACKBONE_MARKERS) for k in backbone) else
                f"only {matched} of the {n_ref} keys of the nearest variant, {variant}, match in name and shape")
        raise CheckpointError(f"{source}: not an OverLoCK {task} checkpoint: {hint}. The file's keys include "
                              f"{', '.join(found) or ', '.join(list(backbone)[:8])} ({len(backbone)} tensors)")
    return variant, deploy, n_ref, matched, missing, unexpected, mismatched


def inspect_state(state: Dict[str, torch.Tensor], source: str, task: Optional[str] = None) -> dict:
    """Task, variant, form and key differences of a state dict (:func:`inspect_checkpoint` after reading)."""
    found_task, prefix = detect_task(state)
    task = task or found_task
    backbone = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} if prefix else dict(state)
    others = {k: v for k, v in state.items() if prefix and not k.startswith(prefix)}
    variant, deploy, n_ref, matched, missing, unexpected, mismatched = match_variant(backbone, task, source)
    head_keys, head_missing, other_keys = 0, [], []
    if task in DENSE_HEADS and others:
        heads = DENSE_HEADS[task]
        expected_heads = _head_keys(task)
        head_keys = sum(1 for k in others if k.startswith(heads))
        head_missing = [k for k in expected_heads if k not in others]
        other_keys = [k for k in others if not k.startswith(heads)]
    num_classes = None
    if task == "classification" and "head.4.weight" in backbone:
        num_classes = int(backbone["head.4.weight"].shape[0])
    elif task == "segmentation" and "decode_head.conv_seg.weight" in others:
        num_classes = int(others["decode_head.conv_seg.weight"].shape[0])
    elif task == "detection" and "roi_head.bbox_head.fc_cls.weight" in others:
        num_classes = int(others["roi_head.bbox_head.fc_cls.weight"].shape[0]) - 1  # + background
    return dict(task=task, prefix=prefix, variant=variant, form="deploy" if deploy else "training",
                num_classes=num_classes, has_aux_head=any(k.startswith("aux_head.") for k in backbone),
                matched=matched, reference_keys=n_ref, missing=missing, unexpected=unexpected,
                mismatched=mismatched, head_keys=head_keys, head_missing=head_missing,
                other_keys=other_keys)


def class_names_of(obj, metadata: Dict[str, str]) -> Optional[List[str]]:
    """Class names stored in the file: overlock run checkpoints, mmdet/mmseg ``meta.CLASSES``, our metadata."""
    names = None
    if isinstance(obj, dict):
        names = obj.get("class_names")
        meta = obj.get("meta")
        if names is None and isinstance(meta, dict):
            names = meta.get("CLASSES") or meta.get("class_names")
    if names is None and metadata.get("class_names"):
        try:
            names = json.loads(metadata["class_names"])
        except ValueError:
            names = None
    if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
        return list(names)
    return None


def _read(path: str, container: str):
    """``read_checkpoint``, also accepting the ``argparse.Namespace`` that timm's training scripts (the official
    ``train.py``) store under ``args``: a plain attribute holder, allowed by name; nothing else is."""
    try:
        return read_checkpoint(path)
    except CheckpointError as e:
        if container == "safetensors" or "argparse.Namespace" not in str(e):
            raise
    import argparse
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - another non-tensor object: the project's message
            raise CheckpointError(f"{path}: refused to unpickle objects other than tensors, plain containers and "
                                  f"argparse.Namespace ({str(e).splitlines()[-1][:300]}). If you trust the file, "
                                  "re-save only its tensors: torch.save(obj['state_dict'], 'clean.pth')") from e


def load_checked(path: str, ema: Optional[bool] = None):
    """Read ``path`` after checking its bytes: ``(container, obj, state, wrapper, has_ema, metadata)``."""
    path = resolve_path(path)
    container = check_container(path)
    obj = _read(path, container)
    metadata = safetensors_metadata(path) if container == "safetensors" else {}
    meta = obj.get("meta") if isinstance(obj, dict) else None
    if isinstance(meta, dict) and meta.get("format") == "overlock-weights-v1":  # written by `overlock convert`
        metadata = {k: v for k, v in meta.items() if isinstance(v, str)}
    state, wrapper, has_ema = select_state(obj, path, ema)
    return container, obj, state, wrapper, has_ema, metadata


def inspect_checkpoint(path: str | os.PathLike, ema: Optional[bool] = None) -> CheckpointInfo:
    """Describe an official or project checkpoint without building or running its model."""
    path = resolve_path(path)
    container, obj, state, wrapper, has_ema, metadata = load_checked(path, ema)
    found = inspect_state(state, path, metadata.get("task"))
    names = class_names_of(obj, metadata)
    if names is not None and found["num_classes"] is not None and len(names) != found["num_classes"]:
        names = None  # names of another head (e.g. before fine-tuning): do not show wrong labels
    n_params = sum(v.numel() for k, v in state.items() if _is_param(k))
    return CheckpointInfo(
        path=path, size=os.path.getsize(path), container=container, wrapper=wrapper, task=found["task"],
        variant=found["variant"], form=found["form"], num_classes=found["num_classes"], class_names=names,
        has_ema=has_ema or metadata.get("ema") == "true", has_aux_head=found["has_aux_head"], num_params=n_params,
        num_tensors=len(state), matched=found["matched"], reference_keys=found["reference_keys"],
        missing=found["missing"], unexpected=found["unexpected"], mismatched=found["mismatched"],
        head_keys=found["head_keys"], head_missing=found["head_missing"], other_keys=found["other_keys"],
        metadata=metadata)
