"""The fuse step: the exact model rebuilt once as a fast inference model.

``models/`` and ``contmix.py`` hold the official function, one plain forward per module. :func:`fuse`
(also what ``timm.utils.reparameterize_model`` runs, through the modules' ``fuse()`` methods) replaces:

- every conv/BatchNorm sequence (:class:`~overlock.layers.ConvNorm`) by convs with the BatchNorm folded in,
  activations in place on the fresh conv outputs, and the dilated re-parameterizable branches merged into one
  large-kernel depthwise conv;
- every GRN MLP by :class:`FusedGrnMlp`: GRN's response folded into the second 1x1 as per-sample weights;
- every ``RepConvBlock`` by :class:`FusedRepConvBlock`: BatchNorm, SE, GRN and LayerScale folded into the
  1x1 weights, run on batch chunks whose wide MLP maps stay small;
- every Focus-Net ``DynamicConvBlock`` by :class:`overlock.fused_focus.FusedDynamicConvBlock`: one flat forward,
  query scale and LayerScales folded.

Both blocks run their 3x3 conv + LayerNorm pairs and their GRN-MLPs' 3x3 conv + GRN statistics, and the
Focus-Net block its 3x3 conv + GELU, as one native call where the kernels run (:meth:`DepthwiseConv.forward_norm`,
:meth:`DepthwiseConv.forward_grn`, :meth:`DepthwiseConv.forward_gelu`).

Folding is done once, here. A fused model computes the eval-mode function of the original (BatchNorm with its
running statistics, no drop path) in any mode; it keeps ``nn.Parameter`` weights, so gradients still flow
(useful for attribution), but it is an inference model: train the original.

Why these folds pay on CPU: around the 1x1 convs most time went to fresh multi-MB outputs (a page fault per
4 KB on first touch) and extra passes over them (a separate GELU output, GRN's ``x * s + beta``, SE's ``x * s``).
Per-sample channel scales become per-sample 1x1 weights (one batched GEMM), shifts become biases, and GELU runs
in place on the GEMM output.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _nn_module
from torch.nn.modules.batchnorm import _BatchNorm

from .layers import GRN, DilatedReparamBlock, LayerNorm2d, LayerScale, PointwiseConv, depthwise_conv, tensor_key
from .ops import depthwise as depthwise_ops
from .ops import gelu as gelu_ops
from .ops import native

__all__ = ["fuse", "fuse_conv_norm", "FusedGrnMlp", "FusedRepConvBlock", "FusedSE", "DepthwiseConv", "PackedConv",
           "InplaceAct", "FastGRN", "NativeRouteCache", "CHUNK_BYTES", "PACK_MIN_BYTES"]

CHUNK_BYTES = 8 << 20  # largest intermediate map per batch chunk in FusedRepConvBlock


def fuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The inference form of ``model``: every submodule with a ``fuse()`` replaced by its result.

    Same walk as ``timm.utils.reparameterize_model`` (modules with ``reparameterize()`` are converted in
    place), without descending into the replaced modules. ``model`` itself is left as it is unless ``inplace``.
    """
    if not inplace:
        model = copy.deepcopy(model)
    _fuse_children(model)
    return model.eval()


def _fuse_children(module: nn.Module) -> None:
    for name, child in module.named_children():
        if hasattr(child, "fuse"):
            setattr(module, name, child.fuse())
            continue
        if hasattr(child, "reparameterize"):
            child.reparameterize()
        _fuse_children(child)


# ------------------------------------------------------------------------------------------------ pieces
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch >= 2.5


def _tracing() -> bool:
    return torch.compiler.is_compiling() or _is_exporting() or torch.jit.is_tracing()


def _inplace_ok(t: torch.Tensor) -> bool:
    """``t``, a fresh output, may be overwritten: no gradient is recorded through it."""
    return not (torch.is_grad_enabled() and t.requires_grad)


def _records_grad(*tensors) -> bool:
    """Autograd records an op on these tensors (``None`` entries ignored): in-place updates and the native kernels
    (no autograd) are then off."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _bn_affine(bn: _BatchNorm):
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    return scale, bn.bias - bn.running_mean * scale


def _param(t: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=like.requires_grad)


def gemm_param(w: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    """A ``(Cout, Cin)`` 1x1-conv weight for the fused blocks' GEMMs, stored as the transpose of a contiguous
    ``(Cin, Cout)`` matrix (same shape and values): ``F.linear`` and ``addmm`` then hand MKL a right operand that is
    not transposed, for which it takes a faster driver on few rows (a 7x7 map at batch 1, Xeon: 49x2048x512 0.58 ->
    0.39 ms, 49x512x2048 0.52 -> 0.42) and the same one on more. Only GEMMs read these weights; the native kernels
    read theirs by address and keep them contiguous."""
    return _param(w.detach().t().contiguous().t(), like)


class DepthwiseConv(nn.Conv2d):
    """Same-size depthwise conv with bias, skipping taps that cannot reach a small map (``depthwise_conv``).

    Without autograd, on the CPUs where the hand-written kernel runs this conv (``ops.depthwise``'s rule), it is
    called directly with the kernel kept in its tap layout: at batch 1 the dispatch around a 3x3 conv on a 14x14
    map cost twice the conv (about 70 us of 110). The kept layout is rebuilt when the weight's storage or version
    changes and dropped by every ``train()``/``eval()`` call (as ``ContMixCore``'s window biases). The route itself
    is decided once per kind of input (shape, strides, dtypes); grad mode, tracing, autocast and the kernels' switch
    are asked on every call.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._direct(x):
            y = native.depthwise_conv2d_taps(x, self._taps(), self.bias, *self.kernel_size)
            if y is not None:
                return y
        return depthwise_conv(x, self.weight, self.bias)

    def forward_norm(self, x: torch.Tensor, norm: nn.Module):
        """``(y, norm(y))`` with ``y = self(x)``. For a 3x3 conv that the kernel runs directly (see ``forward``)
        followed by an affine :class:`~overlock.layers.LayerNorm2d`, one native call normalizes each tile of
        pixels while it is still in cache: the fused blocks' conv-then-norm pairs (a batch-1 14x14 map: one pass
        and one dispatch less). Same ``y`` bits; the norm within float rounding of ``F.layer_norm``. Modules with
        hooks take the two calls."""
        if (self.kernel_size[0] * self.kernel_size[1] <= 9 and type(norm) is LayerNorm2d and self._direct(x)
                and _norm_direct(norm, x) and not _hooked(self, norm)):
            got = native.depthwise_conv2d_taps_norm(x, self._taps(), self.bias, *self.kernel_size, norm.weight,
                                                    norm.bias, norm.eps)
            if got is not None:
                return got
        y = self(x)
        return y, norm(y)

    def forward_norm_identity(self, x: torch.Tensor, norm: nn.Module, scale, shift, out=None):
        """``(y * scale + shift, norm(y))`` with ``y = self(x)`` in the one native call of :meth:`forward_norm` (a
        residual identity and the branch's input), or ``None`` where that call does not run: then ``y`` is left
        to the caller. ``scale``/``shift``: per-channel ``C`` floats or ``None``; ``out``: where to write the
        identity (see ``native.depthwise_conv2d_taps_norm``), or ``None``."""
        vectors = [t for t in (scale, shift) if t is not None]
        if (self.kernel_size[0] * self.kernel_size[1] <= 9 and type(norm) is LayerNorm2d and self._direct(x)
                and _norm_direct(norm, x) and not _hooked(self, norm)
                and not any(torch.is_grad_enabled() and t.requires_grad for t in vectors)):
            return native.depthwise_conv2d_taps_norm(
                x, self._taps(), self.bias, *self.kernel_size, norm.weight, norm.bias, norm.eps,
                None if scale is None else scale.reshape(-1), None if shift is None else shift.reshape(-1), out=out)
        return None

    def forward_gelu(self, x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
        """``GELU(self(x))`` (a fresh output, so in place without autograd); for an exact GELU after a 3x3 conv
        that the kernel runs directly, one native call with the very bits of the two. Hooks: the plain call."""
        if (approximate == "none" and self.kernel_size[0] * self.kernel_size[1] <= 9 and self._direct(x)
                and not _hooked(self)):
            y = native.depthwise_conv2d_taps_gelu(x, self._taps(), self.bias, *self.kernel_size)
            if y is not None:
                return y
        y = self(x)
        return gelu_ops.gelu_(y, approximate) if _inplace_ok(y) else gelu_ops.gelu(y, approximate)

    def forward_grn(self, x: torch.Tensor, gamma: torch.Tensor, apply: bool = False, inplace: bool = False):
        """``(y, grn_scale(gamma, y))`` with ``y = self(x)``; for a 3x3 conv that the kernel runs directly, one
        native call summing GRN's squares while each output row is in cache (same ``y`` bits; the scale within
        float rounding of :func:`grn_scale`'s). With ``apply`` that call may return ``(y * scale, None)`` instead
        (the scale applied); with ``inplace`` it may write ``y`` over ``x`` (a fresh map the caller owns). Hooks:
        the plain calls."""
        if (self.kernel_size[0] * self.kernel_size[1] <= 9 and self._direct(x) and gamma.dtype == torch.float32
                and gamma.numel() == x.shape[1] and gamma.is_contiguous() and gamma.device.type == "cpu"
                and not (torch.is_grad_enabled() and gamma.requires_grad) and not _hooked(self)):
            got = native.depthwise_conv2d_taps_grn(x, self._taps(), self.bias, *self.kernel_size, gamma, apply,
                                                   inplace)
            if got is not None:
                return got
        y = self(x)
        return y, grn_scale(gamma, y)

    def _direct(self, x: torch.Tensor) -> bool:
        # what can change from call to call: grad mode, tracing, autocast, the kernels switched off
        if (type(x) is not torch.Tensor or _tracing() or native._disabled or depthwise_ops._cpu_autocast()
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad
                                                 or (self.bias is not None and self.bias.requires_grad)))
                or not native.used_here()):
            return False
        # the rest is fixed by the input's shape, layout and type: decided once per kind of input (a batch-1
        # 14x14 3x3 conv spent ~8 us of its ~50 in these checks)
        w, b = self.weight, self.bias
        key = (x.shape, x.stride(), x.dtype, x.device, w.dtype, None if b is None else b.dtype,
               depthwise_ops.NATIVE_SMALL_KERNEL_PIXELS, depthwise_ops.NATIVE_SMALL_KERNEL_VALUES)
        kept = self.__dict__.get("_kept_rule")
        if kept is None or kept[0] != key:
            ok = (x.dim() == 4 and x.shape[1] % 8 == 0 and w.shape[0] == x.shape[1] and w.dtype == torch.float32
                  and (b is None or b.dtype == torch.float32)
                  and depthwise_ops.runs_native(x, w, b, self.padding))
            kept = (key, ok)
            self.__dict__["_kept_rule"] = kept
        return kept[1]

    def _taps(self) -> torch.Tensor:
        w = self.weight
        key = tensor_key(w)
        kept = self.__dict__.get("_kept_taps")
        if kept is None or kept[0] != key:
            kept = (key, native._taps(w))
            self.__dict__["_kept_taps"] = kept
        return kept[1]

    def train(self, mode: bool = True):
        self.__dict__.pop("_kept_taps", None)
        self.__dict__.pop("_kept_rule", None)
        return super().train(mode)


def _norm_direct(norm: nn.Module, x: torch.Tensor) -> bool:
    """``norm``, a LayerNorm2d, is a plain float32 affine norm over ``x``'s channels, without autograd."""
    w, b = norm.weight, norm.bias
    return (w is not None and b is not None and tuple(norm.normalized_shape) == (x.shape[1],)
            and w.dtype == b.dtype == torch.float32 and w.device.type == b.device.type == "cpu"
            and w.is_contiguous() and b.is_contiguous()
            and not (torch.is_grad_enabled() and (w.requires_grad or b.requires_grad)))


def _hooked(*modules: nn.Module) -> bool:
    """Any forward hook (the module's own or a global one) that calling the modules one by one would run."""
    return bool(getattr(_nn_module, "_global_forward_hooks", None)
                or getattr(_nn_module, "_global_forward_pre_hooks", None)
                or any(m._forward_hooks or m._forward_pre_hooks for m in modules))


# Dense convs whose weight takes at least this many bytes keep it in oneDNN's blocked layout (PackedConv).
PACK_MIN_BYTES = 1 << 20


class PackedConv(nn.Conv2d):
    """Dense conv that, for inference on CPU, hands oneDNN its weight already in oneDNN's own blocked layout.

    ``F.conv2d`` on a channels_last map re-lays the weight out on every call: for the 3x3 stride-2 256 -> 512
    downsampling conv (4.7 MB of weights) that is 40% of the call at batch 1 (1.09 -> 0.65 ms; batch 16 12.4
    -> 10.7 ms; same bits). For small weights the pre-laid-out call is no faster and at batch 16 can be several
    times slower (3 -> 32 channels at 224: 2.6 -> 11 ms), so only weights of ``PACK_MIN_BYTES`` or more are
    packed, once per input shape (oneDNN picks the layout for the shape). Without autograd only; grad mode,
    tracing, other dtypes, layouts and devices take ``nn.Conv2d``'s forward. The packs are dropped when the weight
    changes and by every ``train()``/``eval()`` call.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        direct = self._direct(x)
        if direct and not x.is_contiguous(memory_format=torch.channels_last):
            # a channel slice of a channels_last map (the Focus-Net's x half into patch_embedx): oneDNN's call on
            # the strided map took 1.2 ms for the 256 -> 512 conv at batch 1, a dense copy then the packed call 0.76
            x = x.contiguous(memory_format=torch.channels_last)
        packed = self._packed(x) if direct else None
        if packed is not None:
            try:
                return torch.ops.mkldnn._convolution_pointwise(x, packed, self.bias, self.padding, self.stride,
                                                               self.dilation, self.groups, "none", [None], None)
            except (RuntimeError, TypeError, AttributeError):  # a torch whose private entry point differs
                self.__dict__["_packs"][1][tuple(x.shape)] = None
        return super().forward(x)

    def _direct(self, x: torch.Tensor) -> bool:
        w = self.weight
        return (type(x) is torch.Tensor and not _tracing() and x.device.type == "cpu" and x.dtype == torch.float32
                and w.dtype == torch.float32 and w.device.type == "cpu" and x.dim() == 4
                and w.numel() * 4 >= PACK_MIN_BYTES and not depthwise_ops._cpu_autocast()
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                                     or (self.bias is not None and self.bias.requires_grad)))
                and x.stride(1) == 1 and torch.backends.mkldnn.is_available()
                and torch.backends.mkldnn.enabled and isinstance(self.padding, tuple))

    def _packed(self, x: torch.Tensor):
        w = self.weight
        version = tensor_key(w)
        packs = self.__dict__.get("_packs")
        if packs is None or packs[0] != version:
            packs = (version, {})
            self.__dict__["_packs"] = packs
        shape = tuple(x.shape)
        if shape not in packs[1]:
            if len(packs[1]) >= 8:  # a server fed many batch sizes: keep a few
                packs[1].clear()
            try:
                with torch.no_grad():
                    packs[1][shape] = torch._C._nn.mkldnn_reorder_conv2d_weight(
                        w.detach().to_mkldnn(), list(self.padding), list(self.stride), list(self.dilation),
                        self.groups, list(shape))
            except (RuntimeError, AttributeError, NotImplementedError):  # a torch without this oneDNN entry point
                packs[1][shape] = None
        return packs[1][shape]

    def train(self, mode: bool = True):
        self.__dict__.pop("_packs", None)
        return super().train(mode)

    def __getstate__(self):  # copies and pickles leave the packs (oneDNN tensors) behind
        state = super().__getstate__()
        state.pop("_packs", None)
        return state


class InplaceAct(nn.Module):
    """GELU or SiLU written over its input when no gradient is recorded (the input is a fresh conv output)."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.kind = "gelu" if isinstance(act, nn.GELU) else "silu"
        self.approximate = getattr(act, "approximate", "none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inplace = _inplace_ok(x)
        if self.kind == "gelu":
            return gelu_ops.gelu_(x, self.approximate) if inplace else gelu_ops.gelu(x, self.approximate)
        return F.silu(x, inplace=inplace)

    def extra_repr(self) -> str:
        return self.kind if self.kind == "silu" else f"gelu, approximate={self.approximate!r}"


def grn_scale(gamma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """GRN's per-sample channel scale ``gamma * nx + 1`` (``GRN(x) == x * scale + beta``).

    Without autograd the spatial norm is a plain sum of squares (much faster on CPU than ``vector_norm``); on a
    channels_last CPU map the whole scale is one pass of a hand-written kernel (``ops.native.grn_scale``).
    """
    if torch.is_grad_enabled() and x.requires_grad:
        gx = torch.linalg.vector_norm(x, dim=(-1, -2), keepdim=True)
    else:
        scale = None if _tracing() or x.device.type != "cpu" or not native.used_here() else native.grn_scale(x, gamma)
        if scale is not None:
            return scale
        gx = x.square().sum(dim=(-1, -2), keepdim=True).sqrt()
    return torch.addcmul(torch.ones_like(gamma), gamma, gx / (gx.mean(dim=1, keepdim=True) + 1e-6))


class FastGRN(nn.Module):
    """GRN computed with :func:`grn_scale` (one multiply-add over the map)."""

    def __init__(self, grn: GRN):
        super().__init__()
        self.gamma, self.beta = grn.gamma, grn.beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.beta, x, grn_scale(self.gamma, x))


class FusedSE(nn.Module):
    """``SEModule`` for inference: the pooled vector goes through two plain ``(B, C)`` matmuls.

    The official SE runs its MLP as 1x1 convs on ``(B, C, 1, 1)`` maps: five ops with layout work each, which at
    batch 1 cost many times their arithmetic (the gate of a 256-channel 14x14 map: 95-140 us here, 128-223 us).
    """

    def __init__(self, se: nn.Module):
        super().__init__()
        _pool, fc1, act, fc2, _gate = se.proj
        self.approximate = act.approximate
        self.fc1_weight, self.fc1_bias = _param(fc1.weight.flatten(1), fc1.weight), fc1.bias
        self.fc2_weight, self.fc2_bias = _param(fc2.weight.flatten(1), fc2.weight), fc2.bias

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """The gate, ``(B, C, 1, 1)``; activations in place on the fresh vectors where no gradient is recorded
        (at batch 1 each op here costs more than its arithmetic: 84 -> 59 us for a 256-channel gate)."""
        B, C = x.shape[:2]
        if self.approximate == "none" and not _tracing() and x.device.type == "cpu" and native.used_here():
            gate = native.se_gate(x, self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias)
            if gate is not None:  # one native call (float32 channels_last, no autograd): 5 ops' dispatch saved
                return gate
        s = F.linear(x.mean(dim=(2, 3)), self.fc1_weight, self.fc1_bias)
        inplace = _inplace_ok(s)
        s = gelu_ops.gelu_(s, self.approximate) if inplace else F.gelu(s, approximate=self.approximate)
        s = F.linear(s, self.fc2_weight, self.fc2_bias)
        return (s.sigmoid_() if inplace else torch.sigmoid(s)).view(B, C, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale(x)


def _conv_with_bn(conv: nn.Module, bn: nn.BatchNorm2d) -> nn.Module:
    """``bn(conv(x))`` as one conv with bias."""
    scale, shift = _bn_affine(bn)
    if isinstance(conv, DilatedReparamBlock):
        weight, bias = (conv.lk_origin.weight, conv.lk_origin.bias) if conv.deploy else conv.merged_kernel()
        c, k = weight.shape[0], weight.shape[-1]
        fused = DepthwiseConv(c, c, k, padding=k // 2, groups=c, bias=True)
        like = conv.lk_origin.weight
    elif _same_size_depthwise(conv):  # through depthwise_conv (and its fast kernels) like the other ones
        weight, bias, like = conv.weight, conv.bias, conv.weight
        c, k = weight.shape[0], weight.shape[-1]
        fused = DepthwiseConv(c, c, k, padding=k // 2, groups=c, bias=True)
    elif type(conv) is nn.Conv2d and conv.padding_mode == "zeros":
        weight, bias, like = conv.weight, conv.bias, conv.weight
        fused = PackedConv(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                           padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
    else:
        weight, bias = conv.weight, conv.bias
        fused = copy.deepcopy(conv)  # same stride, padding, groups; weight and bias replaced below
        like = conv.weight
    bias = shift if bias is None else torch.addcmul(shift, bias, scale)
    fused.weight = _param(weight * scale.view(-1, 1, 1, 1), like)
    fused.bias = _param(bias, like)
    return fused.to(like.device, like.dtype)


def _same_size_depthwise(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.groups == conv.in_channels == conv.out_channels
            and conv.kernel_size[0] == conv.kernel_size[1] and conv.kernel_size[0] % 2 == 1
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
            and conv.padding == (conv.kernel_size[0] // 2,) * 2)


def _bn_then_pointwise(bn: nn.BatchNorm2d, conv: PointwiseConv) -> PointwiseConv:
    """``conv(bn(x))`` as one 1x1: BatchNorm scales the input columns and shifts the bias."""
    scale, shift = _bn_affine(bn)
    w = conv.weight.flatten(1)
    fused = copy.deepcopy(conv)
    fused.weight = _param((w * scale).view_as(conv.weight), conv.weight)
    bias = torch.mv(w, shift) if conv.bias is None else torch.addmv(conv.bias, w, shift)
    fused.bias = _param(bias, conv.weight)
    return fused


def _is_conv(m: nn.Module) -> bool:
    return (type(m) in (nn.Conv2d, PointwiseConv) and m.padding_mode == "zeros") or isinstance(m, DilatedReparamBlock)


def fuse_conv_norm(seq: nn.Sequential) -> nn.Sequential:
    """A conv/BN/activation sequence with every BatchNorm folded into its neighbouring conv.

    Indices are kept (a folded BatchNorm becomes ``nn.Identity``), so ``head.4`` and ``patch_embed1.0`` keep
    their names. Activations right after a folded conv run in place; GRN becomes :class:`FastGRN`.
    """
    mods, out, fresh, i = list(seq), [], False, 0
    while i < len(mods):
        m = mods[i]
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        if _is_conv(m) and isinstance(nxt, _BatchNorm):
            out += [_conv_with_bn(m, nxt), nn.Identity()]
            fresh, i = True, i + 2
            continue
        if isinstance(m, _BatchNorm) and type(nxt) is PointwiseConv:
            out += [nn.Identity(), _bn_then_pointwise(m, nxt)]
            fresh, i = True, i + 2
            continue
        if fresh and isinstance(m, (nn.GELU, nn.SiLU)):
            out.append(InplaceAct(m))
        elif isinstance(m, GRN):
            out.append(FastGRN(m))
        else:
            out.append(m)
        fresh = isinstance(m, (nn.Conv2d, nn.GELU, nn.SiLU))
        i += 1
    return nn.Sequential(*out)


def pointwise_scaled(weight: torch.Tensor, bias, x: torch.Tensor, scale=None, gelu: str | None = None):
    """``1x1(x * scale)`` (then GELU, in place without autograd) as one batched GEMM over the NHWC view.

    ``weight``: ``(Cout, Cin)``; ``scale``: per-sample, per-channel ``(B, Cin, 1, 1)`` or None.
    """
    B, C, H, W = x.shape
    xs = x.permute(0, 2, 3, 1).reshape(B, H * W, C)
    if scale is not None and H * W < weight.shape[0]:
        # small map: per-sample weights would outweigh the activations; scale the map instead
        xs = xs * scale.reshape(B, 1, C)
        scale = None
    # GELU's pass adds the bias (native.bias_gelu_): the GEMM then skips addmm's copy of the bias into its output
    late_bias = (bias is not None and gelu is not None and gelu_ops.native_applies(xs, gelu)
                 and not _records_grad(xs, weight, bias, scale) and not _tracing())
    gemm_bias = None if late_bias else bias
    if scale is None:
        out = F.linear(xs, weight, gemm_bias)
    elif B == 1:  # scaled weights in linear's (Cout, Cin) layout: 3136x64 @ 64x256 0.85 -> 0.66 ms
        out = F.linear(xs, weight * scale.reshape(1, C), gemm_bias)
    else:
        wb = weight.t().unsqueeze(0) * scale.reshape(B, C, 1)  # (B, Cin, Cout)
        out = torch.bmm(xs, wb) if gemm_bias is None else torch.baddbmm(gemm_bias.view(1, 1, -1), xs, wb)
    if late_bias and native.bias_gelu_(out.view(-1, out.shape[-1]), bias):
        gelu = None
    elif late_bias:
        out = out.add_(bias)
    if gelu is not None:
        out = gelu_ops.gelu_(out, gelu) if _inplace_ok(out) else gelu_ops.gelu(out, gelu)
    return out.view(B, H, W, -1).permute(0, 3, 1, 2)


def pointwise_scaled_add(weight: torch.Tensor, bias, x: torch.Tensor, identity: torch.Tensor, scale=None,
                         identity_weight=None) -> torch.Tensor:
    """``identity * identity_weight + 1x1(x * scale)`` (``identity + ...`` without a weight): a block's last 1x1 and
    its residual. Without autograd, on a fresh channels_last ``identity``, the shift and bias are one pass over
    ``identity`` and the GEMM accumulates into it (no bias copy, no separate residual pass)."""
    B, C, H, W = x.shape
    cl = torch.channels_last
    if not (not _records_grad(x, weight, bias, identity, scale, identity_weight) and not _tracing()
            and identity.is_contiguous(memory_format=cl)
            and x.is_contiguous(memory_format=cl) and identity.dtype == x.dtype == weight.dtype
            and identity.shape == (B, weight.shape[0], H, W)):
        out = pointwise_scaled(weight, bias, x, scale=scale)
        if identity_weight is None:
            return out.add_(identity) if _inplace_ok(out) else out + identity
        return out.addcmul_(identity, identity_weight) if _inplace_ok(out) else torch.addcmul(out, identity,
                                                                                             identity_weight)
    acc = identity.permute(0, 2, 3, 1).view(B, H * W, -1)
    if identity_weight is not None and bias is not None:
        torch.addcmul(bias, acc, identity_weight.view(-1), out=acc)
    elif identity_weight is not None:
        acc.mul_(identity_weight.view(-1))
    elif bias is not None:
        acc.add_(bias)
    xs = x.permute(0, 2, 3, 1).view(B, H * W, C)
    if scale is not None and H * W < weight.shape[0]:  # as pointwise_scaled: scale the small map instead
        xs, scale = xs * scale.reshape(B, 1, C), None
    if scale is None:
        acc.view(B * H * W, -1).addmm_(xs.reshape(B * H * W, C), weight.t())
    elif B == 1:
        acc[0].addmm_(xs[0], (weight * scale.reshape(1, C)).t())
    else:
        acc.baddbmm_(xs, weight.t().unsqueeze(0) * scale.reshape(B, C, 1))
    return identity


# From this many pixels per map on, the GRN-MLP's 3x3 conv writes its output over its input at inference
# (native.depthwise_conv2d_taps_grn): its input was just written and is in cache, a fresh output buffer is not.
# Batch 1 in the model, Xeon: 1x256x56x56 0.38 -> 0.31 ms, 1x512x28x28 0.25 -> 0.19; on 14x14 maps the row
# buffers cost more than they save (0.107 -> 0.116).
GRN_CONV_IN_PLACE_MIN_PIXELS = 28 * 28


class FusedGrnMlp(nn.Module):
    """``GrnMlp`` for inference: GELU in place, GRN folded into the second 1x1.

    ``fc2(x * s + beta) == (fc2 * s)(x) + fc2(beta)``: the per-sample scale ``s`` goes into per-sample
    weights, the shift into the bias (computed once here).
    """

    def __init__(self, mlp: nn.Sequential, layer_scale: nn.Module | None = None):
        super().__init__()
        fc1, act, dw, grn, fc2 = mlp
        self.approximate = act.approximate
        self.fc1_weight = gemm_param(fc1.weight.flatten(1), fc1.weight)
        self.fc1_bias = fc1.bias
        self.dwconv = dw.fuse() if hasattr(dw, "fuse") else dw
        self.grn_gamma = grn.gamma  # GRN's beta is folded into fc2_bias
        w2 = fc2.weight.flatten(1)
        b2 = torch.addmv(fc2.bias, w2, grn.beta.flatten())
        if isinstance(layer_scale, LayerScale):  # ls(fc2(y)) == (ls.w * fc2)(y) + ls.w * b + ls.b
            ls_w = layer_scale.weight.flatten()
            w2, b2 = w2 * ls_w[:, None], torch.addcmul(layer_scale.bias, b2, ls_w)
        self.fc2_weight = gemm_param(w2, fc2.weight)
        self.fc2_bias = _param(b2, fc2.weight)

    def hidden(self, x: torch.Tensor, gate=None):
        """``(h, scale)``: the 3x3 conv's output on the GELU'd first 1x1 of ``x * gate`` and GRN's scale of it (for
        the second 1x1 to apply), or ``(h * scale, None)`` where the scale is applied to the map anyway (a map of
        fewer pixels than the second 1x1's outputs, :func:`pointwise_scaled`) and the conv's call can do it."""
        h = pointwise_scaled(self.fc1_weight, self.fc1_bias, x, scale=gate, gelu=self.approximate)
        apply = h.shape[2] * h.shape[3] < self.fc2_weight.shape[0]
        inplace = h.shape[2] * h.shape[3] >= GRN_CONV_IN_PLACE_MIN_PIXELS  # h: a fresh map of ours
        return _conv_then_grn(self.dwconv, self.grn_gamma, h, apply, inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, scale = self.hidden(x)
        return pointwise_scaled(self.fc2_weight, self.fc2_bias, h, scale=scale)

    def forward_add(self, x: torch.Tensor, identity: torch.Tensor, identity_weight=None, gate=None,
                    prepared: bool = False) -> torch.Tensor:
        """``identity * identity_weight + self(x * gate)`` (:func:`pointwise_scaled_add`): the MLP and its
        residual. ``prepared``: ``identity`` is already ``identity * identity_weight + fc2_bias``."""
        h, scale = self.hidden(x, gate)
        if prepared:
            return pointwise_scaled_add(self.fc2_weight, None, h, identity, scale=scale)
        return pointwise_scaled_add(self.fc2_weight, self.fc2_bias, h, identity, scale=scale,
                                    identity_weight=identity_weight)


def _conv_then_gelu(conv: nn.Module, x: torch.Tensor, approximate: str) -> torch.Tensor:
    """``GELU(conv(x))``, in one native call where :meth:`DepthwiseConv.forward_gelu` can."""
    if isinstance(conv, DepthwiseConv):
        return conv.forward_gelu(x, approximate)
    y = conv(x)
    return gelu_ops.gelu_(y, approximate) if _inplace_ok(y) else gelu_ops.gelu(y, approximate)


def _conv_then_grn(conv: nn.Module, gamma: torch.Tensor, x: torch.Tensor, apply: bool = False,
                   inplace: bool = False):
    """``(conv(x), grn_scale(gamma, conv(x)))``, in one native call where :meth:`DepthwiseConv.forward_grn` can
    (with ``apply``, possibly ``(conv(x) * scale, None)``; with ``inplace``, possibly written over ``x``)."""
    if isinstance(conv, DepthwiseConv):
        return conv.forward_grn(x, gamma, apply, inplace)
    y = conv(x)
    return y, grn_scale(gamma, y)


def _conv_then_norm(conv: nn.Module, norm: nn.Module, x: torch.Tensor):
    """``(conv(x), norm(conv(x)))``, in one native call where :meth:`DepthwiseConv.forward_norm` can."""
    if isinstance(conv, DepthwiseConv):
        return conv.forward_norm(x, norm)
    y = conv(x)
    return y, norm(y)


def _conv_then_norm_identity(conv: nn.Module, norm: nn.Module, x: torch.Tensor, scale, shift, out=None):
    """``(identity, norm(conv(x)), prepared)``: where one native call can (:meth:`DepthwiseConv.forward_norm_identity`)
    the identity is ``conv(x) * scale + shift`` already (``prepared``), else plain ``conv(x)``: the residual block's
    identity and the branch's input, the identity's LayerScale and the branch's last bias applied in the same pass
    (:func:`pointwise_scaled_add` then takes neither)."""
    if isinstance(conv, DepthwiseConv):
        got = conv.forward_norm_identity(x, norm, scale, shift, out)
        if got is not None:
            return got[0], got[1], True
    y, z = _conv_then_norm(conv, norm, x)
    return y, z, False


class NativeRouteCache:
    """Mixin of the blocks :mod:`.fused_native` runs: the route it decides once per kind of input (which also
    checks the parameters' dtype, device and layout) is dropped whenever the module is moved or cast (``_apply``:
    ``.to()``, ``.half()``, ...) or changes mode."""

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_native_route", None)
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True):
        self.__dict__.pop("_native_route", None)
        return super().train(mode)


class FusedRepConvBlock(NativeRouteCache, nn.Module):
    """``RepConvBlock`` for inference: BatchNorm, SE, GRN and LayerScale folded, batch-chunked.

    ``proj = [norm, large-kernel conv + BN, SE, 1x1, GELU, dw 3x3, GRN, 1x1]``: the conv and its BN are one
    depthwise conv, SE's per-sample gate scales the first 1x1's weights, GRN folds into the second 1x1 (see
    :class:`FusedGrnMlp`), and the LayerScale goes into the second 1x1 (or, with ``res_scale``, into one
    multiply-add with the identity). Every op is per sample, so the block runs on batch chunks whose widest
    map stays under ``CHUNK_BYTES``: the allocator then reuses the buffers instead of faulting in fresh pages.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        norm, large_kernel, bn, se, *mlp, _drop_path = block.proj  # the official flat layout
        self.res_scale = block.res_scale
        self.dwconv = block.dwconv.fuse() if hasattr(block.dwconv, "fuse") else block.dwconv
        self.norm = norm
        self.large_kernel = _conv_with_bn(large_kernel, bn)
        self.se = se.fuse()
        self.mlp = FusedGrnMlp(nn.Sequential(*mlp), layer_scale=None if self.res_scale else block.ls)
        self.hidden_dim = mlp[0].out_channels
        if self.res_scale and isinstance(block.ls, LayerScale):
            self.ls_weight = _param(block.ls.weight.view(1, -1, 1, 1), block.ls.weight)
            with torch.no_grad():
                self.mlp.fc2_bias.add_(block.ls.bias)
        else:
            self.ls_weight = None

    def _forward(self, x: torch.Tensor, out=None) -> torch.Tensor:
        """The block on ``x``; with ``out`` (no autograd), the residual identity, and so the result, is written there
        where the native conv-then-norm call runs (check the returned tensor)."""
        got = fused_native.repconv_block(self, x, out)  # inference on CPU: one straight-line call
        if got is not None:
            return got
        x, y, prepared = _conv_then_norm_identity(self.dwconv, self.norm, x, self.ls_weight, self.mlp.fc2_bias,
                                                  out)
        y = self.large_kernel(y)
        return self.mlp.forward_add(y, x, self.ls_weight, gate=self.se.scale(y), prepared=prepared)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        per_sample = x.shape[2] * x.shape[3] * x.element_size() * self.hidden_dim  # the widest map of a sample
        n = max(1, CHUNK_BYTES // max(per_sample, 1))
        if _tracing() or n >= x.shape[0]:  # an exported or compiled graph keeps the batch dynamic
            return self._forward(x)
        if torch.is_grad_enabled() or not x.is_contiguous(memory_format=torch.channels_last):
            return torch.cat([self._forward(c) for c in x.split(n)])
        # each chunk's result lands in its slice of one output (a batch slice of a channels_last map is one): no cat
        result = torch.empty_like(x)
        for start in range(0, x.shape[0], n):
            dst = result[start:start + n]
            got = self._forward(x[start:start + n], out=dst)
            if got.data_ptr() != dst.data_ptr() or got.stride() != dst.stride():
                dst.copy_(got)
        return result


from . import fused_native  # noqa: E402  (it builds on the pieces above)
