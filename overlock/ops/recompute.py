"""Training-memory savers: cheap parts of a block recomputed in backward instead of kept alive.

A training step keeps every tensor that some backward formula needs until that backward runs. In OverLoCK
most of those bytes are cheap to rebuild: in a GRN MLP the GELU output, the depthwise-conv output and the GRN
output are each as large as the 4x-wide hidden map, and each is one memory-bound pass away from the
hidden map itself; in a dilated re-parameterizable block every branch keeps its conv output for its
BatchNorm. The functions here keep only the input of such a run of cheap ops and rebuild the rest in
backward, with the very same ops, so values and gradients are those of the plain graph (this is
``torch.utils.checkpoint`` restricted to memory-bound ops, without re-running any GEMM).

``mlp_tail``: ``fc2(mid(h))`` keeping only ``h`` (``mid`` = GELU, residual depthwise conv, GRN); ``fc2``'s
own backward is written out (one GEMM each for the input and weight gradients), so its GEMM is not re-run.
``recompute``: ``fn(x)`` keeping only ``x``; ``fn(x, rerun=True)`` is called in backward and must return the
same values without side effects (BatchNorm must not update its running statistics a second time).
``bn_branch_sum``: ``sum_i BN_i(conv_i(x))`` (the dilated branches of a re-parameterizable block) keeping only ``x``
and each BatchNorm's batch statistics, so backward rebuilds the conv outputs but never runs a BatchNorm forward
(where the native kernels run, its forward takes those statistics itself: BatchNorm's values to float rounding).
Rebuilt ops re-enter the forward's autocast settings (``autocast_as``).
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["mlp_tail", "recompute", "bn_branch_sum", "bn_branches_ok", "enabled", "set_enabled", "autocast_state",
           "autocast_as"]

# On by default: about 35% less training memory for about 5-10% more time per step (overlock_t, CPU, b8);
# OVERLOCK_RECOMPUTE=0 or set_enabled(False) keeps every activation instead (same gradients either way).
_enabled = os.environ.get("OVERLOCK_RECOMPUTE", "1") not in ("0", "false", "False", "no")


def set_enabled(flag: bool) -> None:
    """Turn the recomputation of cheap activations in backward on (default) or off, for all models."""
    global _enabled
    _enabled = bool(flag)


def enabled(*tensors: torch.Tensor) -> bool:
    """Recompute only in eager autograd (not under torch.compile / tracing, which have their own planners)."""
    if not _enabled or not torch.is_grad_enabled() or torch.jit.is_scripting() or torch.jit.is_tracing():
        return False
    if torch.compiler.is_compiling():
        return False
    return True


_AUTOCAST_DEVICES = ("cpu", "cuda")


def autocast_state():
    """This moment's autocast settings per device, ``((device, enabled, dtype), ...)``."""
    state = []
    for device in _AUTOCAST_DEVICES:
        try:
            state.append((device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)))
        except (TypeError, AttributeError):  # torch < 2.4
            if device == "cpu":
                state.append((device, torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()))
            else:
                state.append((device, torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()))
    return tuple(state)


@contextlib.contextmanager
def autocast_as(state):
    """Re-enter the autocast settings ``state`` (from the forward pass) while rebuilding in backward, as
    ``torch.utils.checkpoint`` does: the rebuilt ops must run in the forward's precision (``loss.backward()`` is
    usually called outside the autocast region)."""
    with contextlib.ExitStack() as stack:
        for (device, enabled, dtype), (_, now_enabled, now_dtype) in zip(state, autocast_state()):
            if (enabled, dtype) != (now_enabled, now_dtype):
                stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
        yield


def _grads(outputs: torch.Tensor, inputs: Sequence[torch.Tensor], grad: torch.Tensor):
    """Gradients of ``outputs`` w.r.t. the ``inputs`` that require them (``None`` for the others)."""
    want = [t for t in inputs if t.requires_grad]
    got = iter(torch.autograd.grad(outputs, want, grad, allow_unused=True) if want else ())
    return [next(got) if t.requires_grad else None for t in inputs]


def recompute(fn: Callable, x: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """``fn(x, rerun=False)`` whose backward keeps only ``x`` and runs ``fn(x, rerun=True)`` again.

    ``params``: every tensor ``fn`` uses that needs a gradient (the module's parameters).
    """
    params = tuple(params)
    return _Recompute.apply(fn, len(params), x, *params)


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, n_params, x, *params):
        ctx.fn, ctx.autocast = fn, autocast_state()
        ctx.save_for_backward(x, *params)
        with torch.no_grad():
            return fn(x, rerun=False)

    @staticmethod
    def backward(ctx, grad):
        x, *params = ctx.saved_tensors
        with torch.enable_grad(), autocast_as(ctx.autocast):
            x_ = x.detach().requires_grad_(ctx.needs_input_grad[2])
            out = ctx.fn(x_, rerun=True)
            grads = _grads(out, [x_, *params], grad)
        return (None, None, *grads)


class _MlpTail(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mid, fc2, n_params, h, weight, bias, *params):
        ctx.mid, ctx.autocast = mid, autocast_state()
        ctx.has_bias = bias is not None
        ctx.save_for_backward(h, weight, *params)
        with torch.no_grad():
            return fc2(mid(h))

    @staticmethod
    def backward(ctx, grad):
        h, weight, *params = ctx.saved_tensors
        with autocast_as(ctx.autocast):  # the forward's precision for the rebuilt ops and fc2's products
            with torch.enable_grad():
                h_ = h.detach().requires_grad_(ctx.needs_input_grad[3])
                r = ctx.mid(h_)
            cout, cin = weight.shape[:2]
            g2 = grad.permute(0, 2, 3, 1).reshape(-1, cout)  # (B*H*W, Cout), a view on a channels_last gradient
            grad_w = grad_b = None
            if ctx.needs_input_grad[4]:
                grad_w = g2.t().mm(r.detach().permute(0, 2, 3, 1).reshape(-1, cin)).view_as(weight)
            if ctx.has_bias and ctx.needs_input_grad[5]:
                grad_b = g2.sum(0)
            grad_r = g2.mm(weight.reshape(cout, cin)).view(r.shape[0], r.shape[2], r.shape[3], cin).permute(0, 3, 1, 2)
            grads = _grads(r, [h_, *params], grad_r)
        return (None, None, None, grads[0], grad_w, grad_b, *grads[1:])


def mlp_tail(mid: Callable, params: Sequence[torch.Tensor], fc2: nn.Conv2d, h: torch.Tensor) -> torch.Tensor:
    """``fc2(mid(h))`` keeping only ``h`` for backward (see module docstring); ``fc2`` is a 1x1 conv.

    ``params``: every tensor ``mid`` uses that needs a gradient.
    """
    params = tuple(params)
    return _MlpTail.apply(mid, fc2, len(params), h, fc2.weight, fc2.bias, *params)


def _count_batch(bn: nn.BatchNorm2d) -> float:
    """What ``bn``'s training-mode forward does before normalizing: count the batch; the running-average factor."""
    bn.num_batches_tracked.add_(1)
    return 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum


def bn_branches_ok(branches) -> bool:
    """Whether :func:`bn_branch_sum` applies: plain training-mode BatchNorm2d with affine parameters and running
    statistics (not SyncBatchNorm, not eval mode: those go through :func:`recompute`)."""
    return all(type(bn) is nn.BatchNorm2d and bn.training and bn.track_running_stats and bn.affine
               for _, _, bn in branches)


def bn_branch_sum(x: torch.Tensor, branches, conv: Callable, conv_grads: Callable | None = None,
                  bn_grads: Callable | None = None, conv_into: Callable | None = None) -> torch.Tensor:
    """``sum(bn(conv(x, weight, dilation=d)) for weight, d, bn in branches)``, keeping only ``x`` for backward.

    Backward does not run the BatchNorms forward again: each keeps its batch mean and inverse std from the forward
    pass (C numbers) and BatchNorm's backward kernel is called with them, the very call autograd makes. The conv
    outputs are rebuilt and differentiated one branch at a time, so backward holds one of them instead of all.
    ``conv_grads(x, weight, d)``, if given, returns for a conv it can differentiate without autograd a function
    ``(grad_out, need_x, need_w) -> (grad_x, grad_weight)`` (``None`` elsewhere): then the conv is rebuilt without
    a graph and its gradients come straight from that function. ``bn_grads(x, weight, d)``, if given, returns for
    a branch whose whole backward (conv rebuilt, BatchNorm's backward, both conv gradients) one kernel runs a
    function with :func:`overlock.ops.native.bn_branch_backward`'s arguments after ``dilation`` (``None``
    elsewhere): those branches share one scratch map and add their input gradients into one sum in place.
    ``conv_into(x, weight, d, out)``, if given, writes the conv into ``out`` and returns ``True`` where it can (a
    hand-written kernel): then the forward runs through one scratch map (:func:`_scratch_forward`).
    """
    branches = list(branches)
    params = [p for weight, _, bn in branches for p in (weight, bn.weight, bn.bias)]
    return _BnBranchSum.apply(branches, conv, (conv_grads, bn_grads, conv_into), x, *params)


def _scratch_forward(x: torch.Tensor, branches, conv_into: Callable):
    """``(sum_i BN_i(conv_i(x)), [mean_0, invstd_0, ...])`` with each conv written into one reused scratch map, its
    batch statistics taken in one pass (float64 sums, :func:`overlock.ops.native.bn_batch_stats`) and the
    normalized branch added into the sum in one more (``channel_affine_acc_``); ``None`` where a kernel declines
    (then nothing was committed: the running statistics are updated last, as PyTorch's CPU kernel does, in
    float64).

    Why: PyTorch's ops gave each branch two fresh map-sized buffers (the conv's and BatchNorm's outputs) and five
    passes (conv, two statistics passes, normalize, add); on the first stage at batch 8 (8x64x56x56) the six
    branches' BatchNorms and adds took twice their convs' time, much of it in page faults of the fresh buffers.
    BatchNorm's values to float rounding (its statistics summed in another order).
    """
    from . import native
    B, C, H, W = x.shape
    n = B * H * W
    if (n < 2 or C % 8 or x.dtype != torch.float32 or not x.is_contiguous(memory_format=torch.channels_last)
            or torch.is_autocast_enabled(x.device.type)
            or any(t.dtype != torch.float32 for _, _, bn in branches for t in (bn.weight, bn.running_mean))):
        return None
    scratch = torch.empty_like(x, memory_format=torch.channels_last)
    out = torch.empty_like(scratch)
    stats, moments = [], []
    for i, (weight, d, bn) in enumerate(branches):
        ran = conv_into(x, weight, d, scratch)
        got = native.bn_batch_stats(scratch, bn.weight, bn.bias, bn.eps) if ran else None
        if got is None or not native.channel_affine_acc_(out, scratch, got[0][2], got[0][3], i > 0):
            return None
        stats += [got[0][0], got[0][1]]
        moments.append((bn, got[1]))
    for bn, batch in moments:  # committed once every branch ran: a decline above leaves no trace
        if not native.bn_running_update(bn.running_mean, bn.running_var, batch, _count_batch(bn)):
            raise RuntimeError("overlock: BatchNorm running statistics the native update declined")
    return out, stats


class _BnBranchSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, branches, conv, grad_fns, x, *params):
        ctx.branches, ctx.conv, ctx.autocast = branches, conv, autocast_state()
        ctx.conv_grads, ctx.bn_grads, conv_into = grad_fns
        out, stats = None, []
        with torch.no_grad():
            done = _scratch_forward(x, branches, conv_into) if conv_into is not None else None
            if done is not None:
                out, stats = done
            for weight, d, bn in (branches if done is None else ()):
                y, mean, invstd = torch.native_batch_norm(conv(x, weight, dilation=d), bn.weight, bn.bias,
                                                          bn.running_mean, bn.running_var, True, _count_batch(bn),
                                                          bn.eps)
                stats += [mean, invstd]
                out = y if out is None else out.add_(y)
        ctx.save_for_backward(x, *stats)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, *stats = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_x, grads = None, []
        scratch = grad_sum = None
        for i, (weight, d, bn) in enumerate(ctx.branches):
            need_w, need_gamma, need_beta = need[4 + 3 * i:7 + 3 * i]
            fused = ctx.bn_grads(x, weight.detach(), d) if ctx.bn_grads is not None else None
            if fused is not None:
                if scratch is None:
                    grad = grad.contiguous(memory_format=torch.channels_last)
                    scratch = torch.empty_like(x, memory_format=torch.channels_last)
                    grad_sum = grad.sum((0, 2, 3))
                fresh = need[3] and grad_x is None
                if fresh:
                    grad_x = torch.empty_like(x, memory_format=torch.channels_last)
                got = fused(grad, grad_sum, stats[2 * i], stats[2 * i + 1], bn.weight, scratch,
                            grad_x if need[3] else None, not fresh, need_w)
                if got is not None:
                    gw, dot = got
                    grads += [gw, dot * stats[2 * i + 1] if need_gamma else None,
                              grad_sum.clone() if need_beta else None]
                    continue
                if fresh:  # declined before writing: this branch takes the general path
                    grad_x = None
            with autocast_as(ctx.autocast):
                w = weight.detach()
                direct = ctx.conv_grads(x, w, d) if ctx.conv_grads is not None and (need[3] or need_w) else None
                with torch.set_grad_enabled(direct is None):
                    x_ = x.detach().requires_grad_(need[3] and direct is None)
                    w_ = w.requires_grad_(need_w and direct is None)
                    z = ctx.conv(x_, w_, dilation=d)
                grad_z, grad_gamma, grad_beta = torch.ops.aten.native_batch_norm_backward(
                    grad, z.detach(), bn.weight, None, None, stats[2 * i], stats[2 * i + 1], True, bn.eps,
                    [need[3] or need_w, need_gamma, need_beta])
                got = direct(grad_z, need[3], need_w) if direct is not None else None
                if got is None:
                    if direct is not None:  # a kernel declined after all: rebuild the conv with a graph
                        with torch.enable_grad():
                            x_ = x.detach().requires_grad_(need[3])
                            w_ = weight.detach().requires_grad_(need_w)
                            z = ctx.conv(x_, w_, dilation=d)
                    got = _grads(z, [x_, w_], grad_z)
            gx, gw = got
            if gx is not None:
                grad_x = gx if grad_x is None else grad_x.add_(gx)
            grads += [gw, grad_gamma, grad_beta]
        return (None, None, None, grad_x, *grads)
