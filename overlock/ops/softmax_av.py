"""ContMix's softmax and neighbourhood aggregation for CPU training, in the hand-written kernels.

The PyTorch route (``contmix.context_mix``: logits by matmul, bias added, softmax, then the aggregation as one
dense masked matmul per head) streams the ``(B, G, H*W, k*k)`` logits and weights, and a dense ``(H*W)^2`` weight
matrix per head, through memory in the forward and again in the backward: in an overlock_t training step (b8,
224, AVX2) about 35 ms per Focus-Net block. The kernels (``csrc/neighborhood_avx2.c``) take each pixel's window in
cache: the forward is the inference kernel, the backward rebuilds each pixel's softmax weights from the query,
keys and bias rather than keeping them (nothing of ``(B, G, H*W, k*k)`` size is saved for backward).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import native

__all__ = ["applies", "softmax_av"]


def applies(q: torch.Tensor, keys: torch.Tensor, value: torch.Tensor, smk_size: int, kernel_size: int,
            heads: int) -> bool:
    """Autograd is on and the kernels run here for these tensors: float32 CPU, not traced or compiled, no autocast,
    a multiple of 8 and at most 32 value channels per head, maps at least as large as the windows."""
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, keys, value))):
        return False
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.jit.is_scripting():
        return False
    tensors = (q, keys, value)
    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type != "cpu" or t.dtype != torch.float32
           for t in tensors) or torch.is_autocast_enabled("cpu") or not native.used_here():
        return False
    B, C, H, W = value.shape
    cv = C // (2 * heads)
    k = max(smk_size, kernel_size)
    return cv * 2 * heads == C and cv % 8 == 0 and cv <= 32 and H >= k and W >= k and k * k <= 1024


def softmax_av(q: torch.Tensor, keys_small: torch.Tensor, keys_large: torch.Tensor, bias_small: torch.Tensor,
               bias_large: torch.Tensor, value: torch.Tensor, smk_size: int, kernel_size: int, heads: int
               ) -> torch.Tensor:
    """Both halves of ContMix's aggregation, ``(B, H, W, C)`` (channels innermost): the first ``C/2`` value channels
    with the small kernel, the rest with the large one (see :func:`overlock.contmix.context_mix` for the shapes)."""
    return _SoftmaxAV.apply(q, keys_small, keys_large, bias_small, bias_large, value, smk_size, kernel_size, heads)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(2, B, G, H, W, C / 2G)`` view: the small and large kernels' halves, by head."""
    B, H, W, C = t.shape
    return t.view(B, H, W, 2, heads, C // (2 * heads)).permute(3, 0, 4, 1, 2, 5)


class _SoftmaxAV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, keys_small, keys_large, bias_small, bias_large, value, smk_size, kernel_size, heads):
        B, C, H, W = value.shape
        bs, bl = bias_small.contiguous(), bias_large.contiguous()
        v = _heads(value.permute(0, 2, 3, 1), heads).contiguous()  # compact heads (contmix._native_context_mix)
        out = value.new_empty(B, H, W, C)
        if not native.na2d_softmax_av_pair(q, keys_small, keys_large, bs, bl, v, smk_size, kernel_size,
                                           _heads(out, heads)):
            raise RuntimeError("overlock: the fused ContMix kernel declined tensors that applies() accepted")
        ctx.save_for_backward(q, keys_small, keys_large, bs, bl, value)
        ctx.sizes = smk_size, kernel_size, heads
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, ks, kl, bs, bl, value = ctx.saved_tensors
        q, ks, kl = q.contiguous(), ks.contiguous(), kl.contiguous()  # the backward kernel's layout
        smk_size, kernel_size, heads = ctx.sizes
        B, C, H, W = value.shape
        v = _heads(value.permute(0, 2, 3, 1).contiguous(), heads)
        g = _heads(grad_out.contiguous(), heads)
        grad_value = value.new_empty(B, H, W, C)
        dv = _heads(grad_value, heads)
        small = native.na2d_softmax_av_backward(q, ks, bs, v[0], g[0], dv[0], smk_size)
        large = native.na2d_softmax_av_backward(q, kl, bl, v[1], g[1], dv[1], kernel_size)
        if small is None or large is None:
            raise RuntimeError("overlock: the fused ContMix backward kernel declined tensors its forward took")
        return (small[0] + large[0], small[1], large[1], small[2], large[2], grad_value.permute(0, 3, 1, 2),
                None, None, None)
