"""ContMix: context-mixing dynamic convolution, and the official plug-and-play ``ContMixBlock``.

Per pixel, affinities between its query and the keys of the 7x7 pooled context regions (49 per head) are
mapped by a learned linear layer (``weight_proj``, a 1x1 conv over the 49 affinities) to the logits of two
dynamic kernels, a small ``smk_size^2`` one and a large ``kernel_size^2`` one. A relative position bias is
added, a softmax taken, and the kernels aggregate the values over each pixel's NATTEN-style neighbourhood,
the first half of the channels with the small kernel, the second half with the large one.

The fast path folds ``weight_proj`` into the keys (``q . (P k) == P (q . k)``), so each pixel does one small
matmul against ``smk^2 + k^2`` folded keys instead of two, then aggregates with the tiled backend. The
``unfold`` and ``naive`` backends keep the official order of operations.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import (GRN, PointwiseConv, DilatedReparamBlock, LayerNorm2d, LayerScale, ResDWConv, SEModule,
                     inference_fast_path, mlp_forward, sequential_forward)
from .ops.neighborhood import BACKENDS, na2d_av, rpb_index

__all__ = ["context_mix", "ContMixBlock", "set_backend", "get_backend", "use_backend", "BACKEND_NAMES"]

BACKEND_NAMES = ("tiled", "unfold", "naive")
_backend = os.environ.get("OVERLOCK_CONTMIX_BACKEND", "tiled")


def set_backend(name: str) -> None:
    """Select the ContMix aggregation backend for all models: ``tiled`` (fast), ``unfold`` (official), ``naive``."""
    global _backend
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown ContMix backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    """Temporarily select a ContMix backend (``with overlock.use_backend("unfold"): ...``)."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


if _backend not in BACKEND_NAMES:
    raise ValueError(f"OVERLOCK_CONTMIX_BACKEND={_backend!r} is not one of {', '.join(BACKEND_NAMES)}")
assert set(BACKEND_NAMES) == set(BACKENDS)


def context_mix(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, weight_proj: nn.Conv2d,
                rpb_small: torch.Tensor, rpb_large: torch.Tensor, smk_size: int, kernel_size: int,
                num_heads: int, backend: str | None = None) -> torch.Tensor:
    """Dynamic-kernel aggregation of ContMix.

    Args:
        query: ``(B, C/2, H, W)``, already scaled by ``head_dim ** -0.5``.
        key: ``(B, C/2, 7, 7)`` keys of the pooled context regions.
        value: ``(B, C, H, W)``; first half aggregated with the small kernel, second half with the large one.
        weight_proj: the 1x1 conv mapping 49 affinities to ``smk^2 + k^2`` kernel logits.
        rpb_small, rpb_large: ``(G, 2s-1, 2s-1)`` and ``(G, 2k-1, 2k-1)`` relative position biases.
    Returns:
        ``(B, C, H, W)`` in the memory format of ``value``'s NHWC view (channels_last when the input is).
    """
    backend = backend or _backend
    B, Cq, H, W = query.shape
    G = num_heads
    c = Cq // G
    n_ctx = key.shape[-2] * key.shape[-1]
    ss, kk = smk_size * smk_size, kernel_size * kernel_size
    q = query.permute(0, 2, 3, 1).reshape(B, H * W, G, c).transpose(1, 2)  # (B, G, HW, c)
    k = key.reshape(B, G, c, n_ctx)
    proj_w = weight_proj.weight.reshape(ss + kk, n_ctx)
    bias_s, bias_l = _gather_rpb(rpb_small, H, W, smk_size), _gather_rpb(rpb_large, H, W, kernel_size)
    if backend == "tiled":
        # folded keys; the projection bias joins the (small) position-bias tables instead of the logits
        # Biases are added in place (a matmul does not keep its output for backward): no extra big tensors.
        keys = torch.matmul(k, proj_w.t())  # (B, G, c, ss + kk)
        pb_s, pb_l = weight_proj.bias.split([ss, kk])
        a1 = torch.matmul(q, keys[..., :ss]).add_(bias_s + pb_s)
        a2 = torch.matmul(q, keys[..., ss:]).add_(bias_l + pb_l)
    else:
        logits = torch.matmul(torch.matmul(q, k), proj_w.t()) + weight_proj.bias  # official order
        a1, a2 = logits.split([ss, kk], dim=-1)
        a1 = a1 + bias_s
        a2 = a2 + bias_l
    a1 = a1.softmax(dim=-1).reshape(B, G, H, W, ss)
    a2 = a2.softmax(dim=-1).reshape(B, G, H, W, kk)
    cv = value.shape[1] // (2 * G)
    v = value.permute(0, 2, 3, 1).reshape(B, H, W, 2, G, cv).permute(3, 0, 4, 1, 2, 5)  # (2, B, G, H, W, cv)
    x1 = na2d_av(a1, v[0], smk_size, backend)
    x2 = na2d_av(a2, v[1], kernel_size, backend)
    out = torch.cat([x1.permute(0, 2, 3, 1, 4), x2.permute(0, 2, 3, 1, 4)], dim=3)  # (B, H, W, 2G, cv), one pass
    return out.reshape(B, H, W, 2 * G * cv).permute(0, 3, 1, 2)


def _gather_rpb(table: torch.Tensor, height: int, width: int, kernel_size: int) -> torch.Tensor:
    """``(G, H*W, k*k)`` relative position biases of every pixel's window (``index_select``: one flat gather)."""
    idx = rpb_index(height, width, kernel_size, table.device)
    return table.flatten(1).index_select(1, idx.flatten()).view(table.shape[0], *idx.shape)


def upsampled_size(height: int, width: int, kernel_size: int):
    """The official resize target for maps smaller than the kernel (short side up to ``kernel_size``)."""
    if height < width:
        return kernel_size, int(kernel_size / height * width)
    return int(kernel_size / width * height), kernel_size


def make_rpb(num_heads: int, kernel_size: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))


class ContMixBlock(nn.Module):
    """The official plug-and-play ContMix block (models/contmix.py): ContMix mixer plus a GRN MLP.

    Same constructor arguments and parameter names as the official block; ``use_gemm`` is accepted and
    ignored (no iGEMM kernels needed). ``num_heads`` is doubled internally, as in the official code.
    """

    def __init__(self, dim: int = 64, kernel_size: int = 7, smk_size: int = 5, num_heads: int = 2,
                 mlp_ratio: float = 4, res_scale: bool = False, ls_init_value=None, drop_path: float = 0.,
                 norm_layer=LayerNorm2d, use_gemm: bool = False, deploy: bool = False,
                 use_checkpoint: bool = False, **kwargs):
        super().__init__()
        mlp_dim = int(dim * mlp_ratio)
        self.kernel_size = kernel_size
        self.smk_size = smk_size
        self.num_heads = num_heads * 2
        self.scale = (dim // self.num_heads) ** -0.5
        self.res_scale = res_scale
        self.use_checkpoint = use_checkpoint

        self.dwconv1 = ResDWConv(dim, 3)
        self.norm1 = norm_layer(dim)
        self.weight_query = nn.Sequential(PointwiseConv(dim, dim // 2, bias=False), nn.BatchNorm2d(dim // 2))
        self.weight_key = nn.Sequential(nn.AdaptiveAvgPool2d(7), PointwiseConv(dim, dim // 2, bias=False),
                                        nn.BatchNorm2d(dim // 2))
        self.weight_value = nn.Sequential(PointwiseConv(dim, dim, bias=False), nn.BatchNorm2d(dim))
        self.weight_proj = PointwiseConv(49, kernel_size ** 2 + smk_size ** 2)
        self.fusion_proj = nn.Sequential(PointwiseConv(dim, dim, bias=False), nn.BatchNorm2d(dim))
        self.lepe = nn.Sequential(DilatedReparamBlock(dim, kernel_size, deploy=deploy), nn.BatchNorm2d(dim))
        self.se_layer = SEModule(dim)
        self.gate = nn.Sequential(PointwiseConv(dim, dim, bias=False), nn.BatchNorm2d(dim), nn.SiLU())
        self.proj = nn.Sequential(nn.BatchNorm2d(dim), PointwiseConv(dim, dim))
        self.dwconv2 = ResDWConv(dim, 3)
        self.norm2 = norm_layer(dim)
        self.mlp = nn.Sequential(
            PointwiseConv(dim, mlp_dim), nn.GELU(), ResDWConv(mlp_dim, 3), GRN(mlp_dim), PointwiseConv(mlp_dim, dim))
        self.ls1 = LayerScale(dim, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.ls2 = LayerScale(dim, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.rpb1 = make_rpb(self.num_heads, smk_size)
        self.rpb2 = make_rpb(self.num_heads, kernel_size)
        nn.init.trunc_normal_(self.rpb1, std=0.02)
        nn.init.trunc_normal_(self.rpb2, std=0.02)

    def reparm(self):
        """Official name of the deploy conversion; same as ``timm.utils.reparameterize_model``."""
        for m in self.modules():
            if isinstance(m, DilatedReparamBlock):
                m.reparameterize()

    def _mix(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        resized = min(H, W) < self.kernel_size
        if resized:
            x = F.interpolate(x, size=upsampled_size(H, W, self.kernel_size), mode="bilinear", align_corners=False)
        seq = sequential_forward if inference_fast_path(self, x) else (lambda m, y: m(y))
        out = context_mix(seq(self.weight_query, x) * self.scale, seq(self.weight_key, x), seq(self.weight_value, x),
                          self.weight_proj, self.rpb1, self.rpb2, self.smk_size, self.kernel_size, self.num_heads)
        if resized:
            out = F.adaptive_avg_pool2d(out, (H, W))
        return out

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dwconv1(x)
        identity = x
        x = self.norm1(x)
        fast = inference_fast_path(self, x)  # eval, no autograd, channels_last: BN folded, activations in place
        seq = sequential_forward if fast else (lambda m, y: m(y))
        gate = seq(self.gate, x)
        lepe = seq(self.lepe, x)
        x = seq(self.fusion_proj, self._mix(x)) + lepe
        x = seq(self.proj, gate * self.se_layer(x))
        if self.res_scale:
            x = self.ls1(identity) + self.drop_path(x)
        else:
            x = identity + self.drop_path(self.ls1(x))
        x = self.dwconv2(x)
        mlp = mlp_forward if fast else (lambda m, y: m(y))
        if self.res_scale:
            return self.ls2(x) + self.drop_path(mlp(self.mlp, self.norm2(x)))
        return x + self.drop_path(self.ls2(mlp(self.mlp, self.norm2(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and x.requires_grad:
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)
