"""Model size and cost: parameter counts and FLOPs, computed from the models themselves."""
from __future__ import annotations

import contextlib
import functools
from typing import Dict

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import contmix
from .ops.depthwise import native_kernel_sizes

__all__ = ["count_params", "count_macs", "model_summary"]


def count_params(model: nn.Module, include_aux: bool = False) -> int:
    """Trainable parameters; the auxiliary (deep-supervision) head is excluded unless asked for."""
    return sum(p.numel() for n, p in model.named_parameters() if include_aux or not n.startswith("aux_head."))


@torch.no_grad()
def count_macs(model: nn.Module, img_size: int = 224) -> Dict[str, int]:
    """Multiply-accumulates of one eval-mode forward pass at ``img_size``, by operator kind.

    Counted by PyTorch's FlopCounterMode (FLOPs / 2) with ContMix in the official order of operations on the
    ``unfold`` aggregation (``context_mix_reference``): the natural ``k*k`` products per pixel (the fast
    backend's dense tiles also multiply zeros, which is not part of the model's cost), and every depthwise
    kernel at its own size (not zero-padded to a faster one, ``ops.depthwise.WIDENED_KERNELS``). ``paper`` is
    convolutions plus matrix products without the neighbourhood aggregation, which the paper's counter (fvcore,
    natten's op unknown to it) leaves out; ``total`` adds it.
    """
    model = model.eval()
    x = torch.zeros(1, 3, img_size, img_size)
    counter = FlopCounterMode(display=False)
    with _reference_contmix(), native_kernel_sizes(), counter:
        model(x)
    by_op = {str(op).split(".")[-1]: n // 2 for op, n in counter.get_flop_counts()["Global"].items()}
    aggregation = by_op.get("bmm", 0)
    total = sum(by_op.values())
    return {"paper": total - aggregation, "aggregation": aggregation, "total": total}


@contextlib.contextmanager
def _reference_contmix():
    fast = contmix.context_mix
    contmix.context_mix = functools.partial(contmix.context_mix_reference, backend="unfold")
    try:
        yield
    finally:
        contmix.context_mix = fast


def model_summary(name: str, img_size: int = 224) -> Dict[str, float]:
    """Parameters of the deploy form (no aux head) and GMACs at ``img_size`` for a registered model."""
    import timm

    model = timm.create_model(name, fuse=False).eval()
    deploy = timm.create_model(name if name.endswith("_reparam") else f"{name}_reparam", fuse=False).eval()
    macs = count_macs(deploy, img_size)
    return {
        "model": name,
        "params_m": count_params(deploy) / 1e6,
        "params_train_m": count_params(model) / 1e6,
        "gmacs": macs["paper"] / 1e9,
        "gmacs_total": macs["total"] / 1e9,
        "img_size": img_size,
    }
