"""Optimizer construction shared by the trainers and the benchmarks: PyTorch's fused Adam/AdamW kernel where it exists.

PyTorch's default Adam/AdamW step on CPU loops over the parameter tensors, about a dozen ops each. OverLoCK has many
small tensors (overlock_t with its auxiliary head: 1756, 606 of them in the dilated re-parameterizable blocks;
convnext_tiny: 182). The fused kernel (``fused=True``, CPU from torch 2.4, CUDA from 2.0) updates every tensor in
one call: overlock_t's step 165 -> 53 ms, convnext_tiny's 74 -> 22 ms (AVX2 EPYC, 2 cores; benchmarks/README.md).
Same update rule, summed in another order, so the weights agree to float rounding, not bit for bit, with the loop.
"""
from __future__ import annotations

from typing import Dict, Iterable

import torch

__all__ = ["FUSED_OPTIMIZERS", "fused_kwargs"]

FUSED_OPTIMIZERS = ("adam", "adamw")  # timm optimizer names that are torch.optim.Adam / AdamW


def fused_kwargs(params: Iterable[torch.Tensor], opt: str = "adamw") -> Dict[str, bool]:
    """``{"fused": True}`` when ``opt`` has a fused kernel for every parameter's device and dtype, else ``{}``."""
    if opt.lower() not in FUSED_OPTIMIZERS:
        return {}
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # torch < 2.1
        return {}
    params = list(params)
    ok = params and all(p.device.type in devices and p.is_floating_point() for p in params)
    return {"fused": True} if ok else {}
