"""Small building blocks shared by the OverLoCK blocks.

Parameter names and shapes follow the official code so its checkpoints load as they are. Every layer works
on NCHW tensors in either memory format; none of them forces a layout change, so a model converted to
``channels_last`` stays there end to end.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .ops import grn as grn_ops
from .ops import grn_mlp as grn_mlp_ops
from .ops import native, recompute
from .ops import se as se_ops
from .ops.channel_affine import channel_affine
from .ops.depthwise import depthwise_conv2d, native_grads, runs_native
from .ops.gelu import GELU

__all__ = [
    "LayerNorm2d", "GRN", "SEModule", "LayerScale", "ResDWConv", "DilatedReparamBlock", "PointwiseConv",
    "ConvNorm", "GrnMlp", "conv_bn", "stem", "downsample", "fuse_conv_bn", "depthwise_conv",
]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels (eps 1e-6). In channels_last memory the permute below is free."""

    def __init__(self, dim: int):
        super().__init__(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class PointwiseConv(nn.Conv2d):
    """1x1 conv (an ``nn.Conv2d``: same parameters, same checkpoint keys).

    Wherever the channels are the innermost dimension (a channels_last map, or a channel slice of one, as
    ContMix's query half) the conv is one GEMM on the NHWC view: no layout change and the BLAS matmul path,
    which is faster than the convolution path for these shapes (1.5-1.8x on a 14x14 slice at batch 1).
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and (x.stride(1) == 1 or x.is_contiguous(memory_format=torch.channels_last)):
            return F.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)
        return super().forward(x)


class GRN(nn.Module):
    """Global Response Normalization (ConvNeXt-V2) on NCHW maps: ``x * (gamma * nx + 1) + beta``."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, dim, 1, 1))

    def response(self, x: torch.Tensor) -> torch.Tensor:
        """``nx``: each channel's spatial L2 norm over the sample's mean norm, ``(B, C, 1, 1)``.

        ``vector_norm`` (as the official code) has gradient 0 on an all-zero map, where ``sqrt(sum(x^2))``
        would give NaN.
        """
        gx = torch.linalg.vector_norm(x, dim=(-1, -2), keepdim=True)
        return gx / (gx.mean(dim=1, keepdim=True) + 1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if grn_ops.fast_path(x):  # same values and gradients, fewer passes (overlock/ops/grn.py)
            return grn_ops.grn(x, self.gamma, self.beta)
        return torch.addcmul(self.beta, x, self.gamma * self.response(x) + 1)


class SEModule(nn.Module):
    """Squeeze-and-excitation with GELU inside and a sigmoid gate (``proj.1`` / ``proj.3`` as in the official)."""

    def __init__(self, dim: int, reduction: int = 8):
        super().__init__()
        inner = max(16, dim // reduction)
        self.proj = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            PointwiseConv(dim, inner),
            nn.GELU(),
            PointwiseConv(inner, dim),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if se_ops.applies(x):  # training: the same values, a backward of two passes over the map (ops/se.py)
            return se_ops.squeeze_excite(self, x)
        return x * self.proj(x)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """The gate alone, ``(B, C, 1, 1)`` (``forward(x) == x * scale(x)``)."""
        return self.proj(x)

    def fuse(self) -> nn.Module:
        from .fused import FusedSE
        return FusedSE(self).train(self.training)


class LayerScale(nn.Module):
    """Per-channel affine ``x * w + b``; weight stored as ``(C, 1, 1, 1)`` like the official depthwise conv."""

    def __init__(self, dim: int, init_value: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim, 1, 1, 1), float(init_value)))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_affine(x, self.weight, self.bias)


class ResDWConv(nn.Conv2d):
    """Depthwise conv with a residual connection (``x + dwconv(x)``).

    The identity is folded into the kernel (centre tap + 1), so the residual costs no extra pass over the map
    (and no extra allocation); gradients reach ``weight`` unchanged.
    """

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__(dim, dim, kernel_size=kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depthwise_conv(x, self.residual_weight(), self.bias)

    def residual_weight(self) -> torch.Tensor:
        """The kernel with the identity in its centre tap (differentiable in ``weight``)."""
        c = self.kernel_size[0] // 2
        weight = self.weight.clone()
        weight[:, :, c, c] += 1
        return weight

    def fuse(self) -> nn.Module:
        """A plain depthwise conv holding the residual kernel, built once (not on every call)."""
        from .fused import DepthwiseConv, _param
        conv = DepthwiseConv(self.in_channels, self.out_channels, self.kernel_size, padding=self.padding,
                             groups=self.groups, device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():  # clone() keeps the weight's memory format
            conv.weight = _param(self.residual_weight(), self.weight)
            conv.bias = _param(self.bias, self.bias)
        return conv.train(self.training)


def tensor_key(t: torch.Tensor):
    """What changes when ``t`` is replaced or updated in place: for caches of values derived from a parameter.
    (Inference tensors, e.g. a model deep-copied under ``torch.inference_mode``, have no version counter; they
    cannot be updated in place outside inference mode.)"""
    return t.data_ptr(), (-1 if t.is_inference() else t._version)


def _reachable(x: torch.Tensor, weight: torch.Tensor, dilation: int):
    """``weight`` cropped to the taps that can land on ``x``'s map (a view), and the matching padding."""
    k = weight.shape[-1]
    c = k // 2
    # int(): under torch.compile this specializes on the map size (symbolic padding breaks inductor's conv)
    reach_h = min(c, (int(x.shape[-2]) - 1) // dilation)
    reach_w = min(c, (int(x.shape[-1]) - 1) // dilation)
    if reach_h < c or reach_w < c:
        weight = weight[:, :, c - reach_h:c + reach_h + 1, c - reach_w:c + reach_w + 1]
    return weight, (reach_h * dilation, reach_w * dilation)


def depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias=None, dilation: int = 1) -> torch.Tensor:
    """Same-size depthwise conv (zero padding ``dilation * (k // 2)``) that skips taps which can never reach the map.

    On a map smaller than the kernel's reach (a 13x13 kernel on a 2x2 map, dilated branches on small late maps)
    the outer taps only ever see padding; the kernel is cropped to the taps that can land inside, which gives
    the same output (and gradients, zero for the cropped taps) at a fraction of the cost.
    """
    cropped, padding = _reachable(x, weight, dilation)
    return depthwise_conv2d(x, cropped, bias, padding=padding, dilation=dilation)


def depthwise_conv_grads(x: torch.Tensor, weight: torch.Tensor, dilation: int = 1):
    """Where the hand-written kernels run ``depthwise_conv(x, weight, dilation=dilation)`` (no bias): a function
    ``(grad_out, need_x, need_w) -> (grad_x, grad_weight)`` that needs no autograd graph (``None`` for a gradient
    not asked for; the whole result ``None`` if a kernel declines). ``None`` elsewhere: differentiate the conv."""
    cropped, padding = _reachable(x, weight, dilation)
    if not runs_native(x, cropped, None, padding, dilation):
        return None

    def grads(grad_out: torch.Tensor, need_x: bool, need_w: bool):
        got = native_grads(x, cropped, grad_out, padding, dilation, need_x, need_w)
        if got is None or got[1] is None or cropped.shape == weight.shape:
            return got
        return got[0], _padded_back(got[1], weight)
    return grads


def depthwise_bn_grads(x: torch.Tensor, weight: torch.Tensor, dilation: int = 1):
    """Where the hand-written kernels run ``depthwise_conv(x, weight, dilation=dilation)`` (no bias): a function
    that runs the backward of ``batch_norm(that conv)`` (training statistics) in one native call
    (:func:`overlock.ops.native.bn_branch_backward`, same arguments after ``x, weight, dilation``), the weight
    gradient padded back to ``weight``'s size where the kernel was cropped. ``None`` elsewhere."""
    cropped, padding = _reachable(x, weight, dilation)
    if not runs_native(x, cropped, None, padding, dilation):
        return None

    def grads(grad, grad_sum, mean, invstd, gamma, scratch, grad_x, add, need_w):
        got = native.bn_branch_backward(x, cropped, dilation, grad, grad_sum, mean, invstd, gamma, scratch, grad_x,
                                        add, need_w)
        if got is None or got[0] is None or cropped.shape == weight.shape:
            return got
        return _padded_back(got[0], weight), got[1]
    return grads


def depthwise_conv_into(x: torch.Tensor, weight: torch.Tensor, dilation: int, out: torch.Tensor,
                        bias: Optional[torch.Tensor] = None) -> bool:
    """``depthwise_conv(x, weight, bias, dilation=dilation)`` written into ``out`` where the hand-written kernel
    runs it (``True``); ``False`` elsewhere, ``out`` untouched."""
    cropped, padding = _reachable(x, weight, dilation)
    if not runs_native(x, cropped, bias, padding, dilation):
        return False
    return native.depthwise_conv2d_same(x, cropped, bias, dilation, out=out) is not None


def _padded_back(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The gradient of a kernel cropped by :func:`_reachable`, zero for the taps that never met the map."""
    full = weight.new_zeros(weight.shape)
    dh, dw = (weight.shape[-2] - grad.shape[-2]) // 2, (weight.shape[-1] - grad.shape[-1]) // 2
    full[:, :, dh:dh + grad.shape[-2], dw:dw + grad.shape[-1]] = grad
    return full


def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d):
    """Weight and bias of a conv followed by an eval-mode BatchNorm, as one conv."""
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    return conv.weight * scale.reshape(-1, 1, 1, 1), bn.bias + (bias - bn.running_mean) * scale


def _batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor, rerun: bool) -> torch.Tensor:
    """``bn(x)``; when re-run for backward, the same values without a second running-statistics update."""
    if rerun and bn.training:
        return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    return bn(x)


# UniRepLKNet's dilated branches: (kernel sizes, dilations) per large kernel size.
_DILATED_BRANCHES = {
    19: ((5, 7, 9, 9, 3, 3, 3), (1, 1, 1, 2, 4, 5, 7)),
    17: ((5, 7, 9, 3, 3, 3), (1, 1, 2, 4, 5, 7)),
    15: ((5, 7, 7, 3, 3, 3), (1, 1, 2, 3, 5, 7)),
    13: ((5, 7, 7, 3, 3, 3), (1, 1, 2, 3, 4, 5)),
    11: ((5, 7, 5, 3, 3, 3), (1, 1, 2, 3, 4, 5)),
    9: ((5, 7, 5, 3, 3), (1, 1, 2, 3, 4)),
    7: ((5, 3, 3, 3), (1, 1, 2, 3)),
    5: ((3, 3), (1, 2)),
}


class DilatedReparamBlock(nn.Module):
    """Large-kernel depthwise conv plus parallel dilated small-kernel branches (UniRepLKNet).

    Training form: ``lk_origin`` (no bias) + ``origin_bn`` and one conv+BN per dilated branch. Deploy form:
    a single biased ``lk_origin``; :meth:`reparameterize` converts in place (also what
    ``timm.utils.reparameterize_model`` calls).
    """

    def __init__(self, channels: int, kernel_size: int, deploy: bool = False):
        super().__init__()
        if kernel_size not in _DILATED_BRANCHES:
            raise ValueError(f"DilatedReparamBlock supports kernel sizes {sorted(_DILATED_BRANCHES)}, "
                             f"got {kernel_size}")
        self.kernel_size = kernel_size
        self.kernel_sizes, self.dilates = _DILATED_BRANCHES[kernel_size]
        self.lk_origin = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels,
                                   bias=deploy)
        self.deploy = deploy
        if not deploy:
            self.origin_bn = nn.BatchNorm2d(channels)
            for k, r in zip(self.kernel_sizes, self.dilates):
                self.add_module(f"dil_conv_k{k}_{r}", nn.Conv2d(
                    channels, channels, k, padding=(r * (k - 1) + 1) // 2, dilation=r, groups=channels, bias=False))
                self.add_module(f"dil_bn_k{k}_{r}", nn.BatchNorm2d(channels))

    def _branches(self):
        for k, r in zip(self.kernel_sizes, self.dilates):
            yield r, getattr(self, f"dil_conv_k{k}_{r}"), getattr(self, f"dil_bn_k{k}_{r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return depthwise_conv(x, self.lk_origin.weight, self.lk_origin.bias)
        out = self.origin_bn(depthwise_conv(x, self.lk_origin.weight))
        if recompute.enabled():
            # The large kernel's output is kept for its BatchNorm (rebuilding it would cost a whole large-kernel
            # conv); the dilated branches keep only x and are rebuilt in backward.
            branches = [(conv.weight, r, bn) for r, conv, bn in self._branches()]
            if recompute.bn_branches_ok(branches):
                return out.add_(recompute.bn_branch_sum(x, branches, depthwise_conv, depthwise_conv_grads,
                                                        depthwise_bn_grads, depthwise_conv_into))
            params = [p for w, _, bn in branches for p in (w, bn.weight, bn.bias) if p.requires_grad]
            return out + recompute.recompute(self._dilated_sum, x, params)
        return out.add_(self._dilated_sum(x))

    def _dilated_sum(self, x: torch.Tensor, rerun: bool = False) -> torch.Tensor:
        out = None
        for r, conv, bn in self._branches():
            y = _batch_norm(bn, depthwise_conv(x, conv.weight, dilation=r), rerun)
            out = y if out is None else out.add_(y)
        return out

    @torch.no_grad()
    def merged_kernel(self):
        """Weight and bias of the single conv equal to this block in eval mode."""
        weight, bias = fuse_conv_bn(self.lk_origin, self.origin_bn)
        for r, conv, bn in self._branches():
            w, b = fuse_conv_bn(conv, bn)
            k = w.shape[-1]
            span = r * (k - 1) + 1
            dilated = w.new_zeros(w.shape[0], 1, span, span)
            dilated[:, :, ::r, ::r] = w
            pad = self.kernel_size // 2 - span // 2
            weight = weight + F.pad(dilated, [pad] * 4)
            bias = bias + b
        return weight, bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.deploy:
            return
        weight, bias = self.merged_kernel()
        conv = nn.Conv2d(weight.shape[0], weight.shape[0], self.kernel_size, padding=self.kernel_size // 2,
                         groups=weight.shape[0], bias=True).to(weight.device, weight.dtype)
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        if self.lk_origin.weight.is_contiguous(memory_format=torch.channels_last):
            conv = conv.to(memory_format=torch.channels_last)
        self.lk_origin = conv
        del self.origin_bn
        for k, r in zip(self.kernel_sizes, self.dilates):
            delattr(self, f"dil_conv_k{k}_{r}")
            delattr(self, f"dil_bn_k{k}_{r}")
        self.deploy = True


class ConvNorm(nn.Sequential):
    """A conv / BatchNorm / activation sequence, indexed as in the official code (so its keys load as they are).

    ``fuse()`` folds each eval-mode BatchNorm into its neighbouring conv, once (like LeViT's ``ConvNorm.fuse``);
    see :mod:`overlock.fused`.
    """

    def fuse(self) -> nn.Module:
        from .fused import fuse_conv_norm
        return fuse_conv_norm(self).train(self.training)


class GrnMlp(nn.Sequential):
    """ConvNeXt-V2 MLP: 1x1 expansion, GELU, residual 3x3 depthwise conv, GRN, 1x1 projection.

    In training the GELU, depthwise-conv and GRN outputs (each as wide as the hidden map) are not kept for
    backward but rebuilt from the hidden map (:func:`grn_mlp`).
    """

    def __init__(self, dim: int, hidden_dim: int, out_dim: int | None = None):
        super().__init__(PointwiseConv(dim, hidden_dim), GELU(), ResDWConv(hidden_dim, 3), GRN(hidden_dim),
                         PointwiseConv(hidden_dim, out_dim or dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grn_mlp(self, x)

    def fuse(self) -> nn.Module:
        from .fused import FusedGrnMlp
        return FusedGrnMlp(self).train(self.training)


def grn_mlp(layers, x: torch.Tensor) -> torch.Tensor:
    """Run the five GRN-MLP layers ``(fc1, act, dwconv, grn, fc2)`` on ``x``.

    With autograd on, only ``fc1``'s output is kept for the middle three (memory-bound) layers, which
    backward runs again: for the stock layers with a hand-written backward (:mod:`overlock.ops.grn_mlp`), for
    any others by autograd (:func:`overlock.ops.recompute.mlp_tail`); same values and gradients.
    """
    fc1, act, dw, grn, fc2 = layers
    h = fc1(x)
    if not recompute.enabled():
        return fc2(grn(dw(act(h))))
    if grn_mlp_ops.applies(act, dw, grn, fc2, h):  # the stock layers: hand-written backward, fewer fresh maps
        return grn_mlp_ops.grn_mlp_tail(act, dw, grn, fc2, h)

    def mid(t):
        return grn(dw(act(t)))
    return recompute.mlp_tail(mid, [*dw.parameters(), *grn.parameters()], fc2, h)


def conv_bn(in_dim: int, out_dim: int, *act: nn.Module) -> ConvNorm:
    """1x1 conv without bias, BatchNorm, optional activation (ContMix's projections)."""
    return ConvNorm(PointwiseConv(in_dim, out_dim, bias=False), nn.BatchNorm2d(out_dim), *act)


def stem(in_chans: int, dim: int) -> ConvNorm:
    """Four 3x3 convs with BN (GELU between), stride 4 overall."""
    half = dim // 2
    return ConvNorm(
        nn.Conv2d(in_chans, half, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(half), GELU(),
        nn.Conv2d(half, half, 3, padding=1, bias=False), nn.BatchNorm2d(half), GELU(),
        nn.Conv2d(half, dim, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(dim), GELU(),
        nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim),
    )


def downsample(in_dim: int, out_dim: int) -> ConvNorm:
    """Stride-2 3x3 conv + BN between stages."""
    return ConvNorm(nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out_dim))
