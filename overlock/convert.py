"""Checkpoint conversion: official or project ``.pth`` files to safetensors (with metadata), and back.

The keys stay those of the source (official names; ``backbone.``/``decode_head.``/... for mmdet/mmseg files), so
a converted file loads wherever the source did: ``timm.create_model(..., pretrained_cfg_overlay=dict(file=DST))``,
``overlock.load_into``, ``overlock.create_dense_backbone(..., checkpoint=DST)``. Options:

- ``reparam``: the deploy form (dilated branches merged, as the official ``_reparam`` release files), computed by
  :func:`overlock.weights.fit_state_dict` into the ``_reparam`` model of the same variant;
- ``drop_aux``: without the auxiliary head (classification ``aux_head.*``, UperNet ``auxiliary_head.*``), which
  inference never uses;
- ``ema``: take the EMA weights (default when present, as timm does) or the raw ones.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from . import __version__
from .inspection import (DENSE_HEADS, class_names_of, inspect_state, load_checked, model_name, resolve_path,
                         sha256_file, variant_config)
from .weights import CheckpointError, fit_state_dict

__all__ = ["convert_checkpoint", "ConversionResult", "to_deploy_form", "verify_deploy_form", "METADATA_FORMAT"]

METADATA_FORMAT = "overlock-weights-v1"
SAFETENSORS_EXT = (".safetensors",)
TORCH_EXT = (".pth", ".pt", ".bin", ".ckpt")


@dataclass
class ConversionResult:
    path: str
    metadata: Dict[str, str]
    num_tensors: int
    dropped: List[str]
    verified: Optional[float] = None  # relative error deploy vs training form (with reparam)

    def __str__(self) -> str:
        m = self.metadata
        model = model_name(m["variant"], m["form"] == "deploy")
        lines = [f"wrote {self.path}: {self.num_tensors} tensors, {m['task']} {model} ({m['form']} form)"
                 + (f", {m['num_classes']} classes" if m.get("num_classes") else "")
                 + f", weights from '{m['source_weights'] or 'top level'}'"
                 + (" (EMA)" if m["ema"] == "true" else "")]
        if self.verified is not None:
            lines.append(f"verified: deploy form vs training form on a 1x3x64x64 input, relative error "
                         f"{self.verified:.1e}")
        if self.dropped:
            lines.append(f"left out {len(self.dropped)} tensors: {', '.join(self.dropped[:6])}"
                         + (" ..." if len(self.dropped) > 6 else ""))
        return "\n".join(lines)


def to_deploy_form(state: Dict[str, torch.Tensor], variant: str, task: str, source: str) -> Dict[str, torch.Tensor]:
    """Merge the dilated branches of a training-form backbone (or classifier) state into the deploy form."""
    from .models import OverLoCK, OverLoCKDense
    args = dict(variant_config(variant), deploy=True)
    has_aux = any(k.startswith("aux_head.") for k in state)
    if task == "classification":
        num_classes = int(state["head.4.weight"].shape[0]) if "head.4.weight" in state else 0
        model = OverLoCK(use_ds=has_aux, **{**args, "num_classes": num_classes})
    else:
        model = OverLoCKDense(kind=task, **args)
    merged = fit_state_dict(state, model, source, classifiers=())
    expected = model.state_dict()
    missing = [k for k in expected if k not in merged]
    unexpected = [k for k in merged if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{source}: could not form the deploy form of {variant}: missing {missing[:6]}, "
                              f"unexpected {unexpected[:6]}")
    return {k: merged[k] for k in expected}  # in the model's order, as a saved model would be


def _build(variant: str, task: str, state: Dict[str, torch.Tensor], deploy: bool):
    from .models import OverLoCK, OverLoCKDense
    args = dict(variant_config(variant), deploy=deploy)
    if task == "classification":
        num_classes = int(state["head.4.weight"].shape[0]) if "head.4.weight" in state else 0
        model = OverLoCK(use_ds=any(k.startswith("aux_head.") for k in state), num_classes=num_classes, **args)
    else:
        model = OverLoCKDense(kind=task, **args)
    model.load_state_dict(state, strict=True)
    return model.eval()


def verify_deploy_form(train: Dict[str, torch.Tensor], deploy: Dict[str, torch.Tensor], variant: str, task: str,
                       source: str, size: int = 64, tolerance: float = 1e-4) -> float:
    """Relative error between the training-form and the converted deploy-form model on one random input."""
    a, b = _build(variant, task, train, False), _build(variant, task, deploy, True)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ya, yb = a(x), b(x)
    ya = ya if isinstance(ya, (list, tuple)) else [ya]
    yb = yb if isinstance(yb, (list, tuple)) else [yb]
    err = max(((p.double() - q.double()).norm() / q.double().norm().clamp_min(1e-30)).item() for p, q in zip(yb, ya))
    if not err <= tolerance:
        raise CheckpointError(f"{source}: the deploy form computed from this file differs from its training form "
                              f"(relative error {err:.2e} > {tolerance:g} on a 1x3x{size}x{size} input); nothing "
                              "was written")
    return err


def _plain(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Contiguous tensors that share no memory (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for k, v in state.items():
        v = v.detach().contiguous()
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        if ptr in seen:
            v = v.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[k] = v
    return out


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, reparam: bool = False,
                       drop_aux: bool = False, ema: Optional[bool] = None, class_names: Optional[List[str]] = None,
                       overwrite: bool = False, verify: bool = True) -> ConversionResult:
    """Convert ``src`` (official/project checkpoint, ``.pth`` or ``.safetensors``) to ``dst`` (format by suffix).

    With ``reparam`` and ``verify`` the training and the deploy form are run on one 64x64 input and must agree
    within 1e-4 (relative) before anything is written."""
    src, dst = resolve_path(src), os.fspath(dst)
    if not dst.endswith(SAFETENSORS_EXT + TORCH_EXT):
        raise ValueError(f"{dst}: the destination must end in .safetensors (safetensors) or .pth/.pt (PyTorch)")
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError(f"{dst}: the destination is the source file")
    container, obj, state, wrapper, has_ema, metadata = load_checked(src, ema)
    found = inspect_state(state, src, metadata.get("task"))
    if found["missing"] or found["mismatched"] or found["unexpected"]:
        def few(items):
            return ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "")
        raise CheckpointError(
            f"{src}: the {found['task']} weights do not fit OverLoCK variant {found['variant']} (nearest; "
            f"{found['form']} form): missing keys: {few(found['missing']) or '-'}; unexpected keys: "
            f"{few(found['unexpected']) or '-'}; shape mismatches: {few(found['mismatched']) or '-'}. "
            "Run `overlock inspect` on the file for details.")
    task, prefix, variant = found["task"], found["prefix"], found["variant"]
    state = dict(state)
    dropped: List[str] = []
    verified = None
    if drop_aux:
        aux = "aux_head." if task == "classification" else "auxiliary_head."
        dropped = [k for k in state if k.startswith(aux)]
        for k in dropped:
            del state[k]
    form = found["form"]
    if reparam and form == "training":
        backbone = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        merged = to_deploy_form(backbone, variant, task, src)
        if verify:
            verified = verify_deploy_form(backbone, merged, variant, task, src)
        others = {k: v for k, v in state.items() if not k.startswith(prefix)} if prefix else {}
        state = {**{prefix + k: v for k, v in merged.items()}, **others}
        form = "deploy"
    names = class_names if class_names is not None else class_names_of(obj, metadata)
    num_classes = found["num_classes"]
    if names is not None and num_classes is not None and len(names) != num_classes:
        if class_names is not None:
            raise ValueError(f"{len(names)} class names given but the checkpoint's classifier has {num_classes} "
                             "classes")
        names = None
    meta = {
        "format": METADATA_FORMAT,
        "overlock_version": __version__,
        "variant": variant,
        "task": task,
        "form": form,
        "num_classes": "" if num_classes is None else str(num_classes),
        "aux_head": json.dumps(any(k.startswith(("aux_head.", "auxiliary_head.")) for k in state)),
        "ema": json.dumps(bool(wrapper in ("state_dict_ema", "model_ema")
                               or (not wrapper and metadata.get("ema") == "true"))),
        "source_file": os.path.basename(src),
        "source_sha256": sha256_file(src),
        "source_weights": wrapper,
    }
    if metadata.get("source_sha256"):  # converted before: keep the provenance of the original file
        meta["origin_file"] = metadata.get("origin_file") or metadata.get("source_file", "")
        meta["origin_sha256"] = metadata.get("origin_sha256") or metadata["source_sha256"]
    if names is not None:
        meta["class_names"] = json.dumps(names)
    if task in DENSE_HEADS:
        meta["dense_heads"] = ",".join(p.rstrip(".") for p in DENSE_HEADS[task]
                                       if any(k.startswith(p) for k in state))
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    tmp = dst + ".tmp"
    if dst.endswith(SAFETENSORS_EXT):
        from safetensors.torch import save_file
        save_file(_plain(state), tmp, metadata=meta)
    else:
        # the official layout ({'state_dict': ...}; mmdet/mmseg add 'meta'), readable with weights_only=True
        file_meta = dict(meta)
        if names is not None:
            file_meta["CLASSES"] = list(names)
        torch.save({"state_dict": state, "meta": file_meta}, tmp)
    os.replace(tmp, dst)
    return ConversionResult(dst, meta, len(state), dropped, verified)
