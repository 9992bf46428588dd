"""Model weights: reading official and project checkpoint files safely, and fitting them to a model.

Files are read with ``torch.load(weights_only=True)`` or safetensors: tensors and plain containers only, never
arbitrary pickled objects. Official files come as a raw state dict or wrapped under ``state_dict``,
``model``, ``state_dict_ema`` or ``model_ema`` (mmdet/mmseg files under ``state_dict`` with ``backbone.``
prefixes).
"""
from __future__ import annotations

import logging
import os
import pickle
import re
import warnings
from typing import Dict, Iterable, Optional

import torch
from torch import nn

_logger = logging.getLogger("overlock")

__all__ = ["read_checkpoint", "unwrap_state_dict", "fit_state_dict", "load_into", "CheckpointError"]

WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used with the model at hand; the message says why and what to do."""


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint file (``.pth``/``.pt``/``.bin`` via weights-only torch.load, or ``.safetensors``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return load_file(path, device="cpu")
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to unpickle objects other than tensors and plain containers ({e}). If you trust the "
            "file, re-save only its tensors: torch.save(obj['state_dict'], 'clean.pth').") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from e


def unwrap_state_dict(obj, source: str = "checkpoint", prefer_ema: bool = True) -> Dict[str, torch.Tensor]:
    """The tensor dict inside ``obj``; strips DDP's ``module.`` prefix."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: expected a dict of tensors, found {type(obj).__name__}")
    keys = WRAPPER_KEYS if prefer_ema else ("state_dict", "model", "state_dict_ema", "model_ema")
    for key in keys:
        inner = obj.get(key)
        if isinstance(inner, dict) and inner:
            obj = inner
            break
    state = {k[7:] if k.startswith("module.") else k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"{source}: no tensors found (looked for a raw state dict and under {WRAPPER_KEYS})")
    return state


_DRB_KEY = re.compile(r"^(.*)\.origin_bn\.weight$")


def _merge_dilated_branches(state: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Convert training-form dilated branches into the deploy form when ``model`` expects it."""
    from .layers import DilatedReparamBlock

    targets = dict(model.named_modules())
    out = dict(state)
    for key in list(state):
        m = _DRB_KEY.match(key)
        if not m:
            continue
        prefix = m.group(1)
        target = targets.get(prefix)
        if not isinstance(target, DilatedReparamBlock) or not target.deploy:
            continue
        weight = state[f"{prefix}.lk_origin.weight"]
        block = DilatedReparamBlock(weight.shape[0], weight.shape[-1], deploy=False)
        sub = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
        block.load_state_dict(sub)
        merged_w, merged_b = block.merged_kernel()
        for k in sub:
            out.pop(f"{prefix}.{k}")
        out[f"{prefix}.lk_origin.weight"] = merged_w
        out[f"{prefix}.lk_origin.bias"] = merged_b
    return out


def fit_state_dict(state: Dict[str, torch.Tensor], model: nn.Module, source: str = "checkpoint",
                   classifiers: Iterable[str] = ("head.4", "aux_head.2")) -> Dict[str, torch.Tensor]:
    """Adapt an official/project state dict to ``model``.

    - auxiliary head weights are dropped (with a notice) when the model has no auxiliary head;
    - training-form dilated branches are merged when the model is in deploy form;
    - classifiers whose class count differs are left out, so the model keeps fresh ones (with a warning).
    """
    expected = model.state_dict()
    state = dict(state)
    aux = [k for k in state if k.startswith("aux_head.")]
    if aux and not any(k.startswith("aux_head.") for k in expected):
        for k in aux:
            del state[k]
        _logger.info("%s: auxiliary head weights not used (the model has no aux head; pass use_ds=True to keep it)",
                     source)
    if any(k.endswith(".origin_bn.weight") for k in state) and not any(k.endswith(".origin_bn.weight")
                                                                        for k in expected):
        state = _merge_dilated_branches(state, model)
    if any(k.endswith(".lk_origin.bias") for k in state) and any(k.endswith(".origin_bn.weight") for k in expected):
        raise CheckpointError(
            f"{source}: this is a deploy-form (re-parameterized) checkpoint; load it into the matching '_reparam' "
            "model (e.g. overlock_t_reparam), or use the training-form file for training")
    fresh = []
    for name in classifiers:
        wkey = f"{name}.weight"
        if wkey in state and wkey in expected and state[wkey].shape != expected[wkey].shape:
            fresh.append(f"{name} ({state[wkey].shape[0]} -> {expected[wkey].shape[0]} classes)")
            state.pop(wkey)
            state.pop(f"{name}.bias", None)
        elif wkey in state and wkey not in expected:
            state.pop(wkey)
            state.pop(f"{name}.bias", None)
    if fresh:
        warnings.warn(f"{source}: classifier class count differs from the checkpoint; fresh, randomly initialised "
                      f"classifiers for fine-tuning: {', '.join(fresh)}", stacklevel=3)
    return state


def _strict_load(model: nn.Module, state: Dict[str, torch.Tensor], source: str, allow_missing=()) -> list:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not any(k.startswith(p) for p in allow_missing)]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        def few(items):
            return ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {few(unexpected)}")
        if wrong:
            parts.append(f"shape mismatches: {few(wrong)}")
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + "; ".join(parts) +
                              ". Check that the model name (xt/t/s/b, _reparam) matches the checkpoint.")
    model.load_state_dict(state, strict=False)
    return [k for k in expected if k not in state]


def load_into(model: nn.Module, path_or_state, source: Optional[str] = None) -> nn.Module:
    """Load an official or project checkpoint (file path or dict) into an OverLoCK classifier, strictly."""
    if isinstance(path_or_state, (str, os.PathLike)):
        source = source or os.fspath(path_or_state)
        obj = read_checkpoint(path_or_state)
    else:
        source = source or "state dict"
        obj = path_or_state
    state = fit_state_dict(unwrap_state_dict(obj, source), model, source)
    fresh = [f"{name}." for name in ("head.4", "aux_head.2") if f"{name}.weight" not in state]
    if not any(k.startswith("aux_head.") for k in state) and any(k.startswith("aux_head.")
                                                                  for k in model.state_dict()):
        warnings.warn(f"{source}: no auxiliary head weights in the checkpoint; the aux head starts fresh",
                      stacklevel=2)
        fresh.append("aux_head.")
    _strict_load(model, state, source, allow_missing=fresh)
    return model
