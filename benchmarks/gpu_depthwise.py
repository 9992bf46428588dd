"""Issue #12, GPU: the large-kernel depthwise convs took 75% of an overlock_t training step on an H200 (bf16
autocast, channels_last: cuDNN's ``conv2d_grouped_direct_kernel``). Which layout and cuDNN setting runs them fast?

Per depthwise shape of overlock_t (forward + both gradients, batch ``--batch``, fresh NCHW-strided weights):
channels_last or NCHW, ``cudnn.benchmark`` off or on. Whole training steps with large and dilated depthwise convs
routed through an NCHW copy of the map, with the model's weights as they are and restrided NCHW; all or only the
large and dilated depthwise convs in the Triton kernels (``overlock.ops.depthwise_triton``), with their error.
"""
from __future__ import annotations

import argparse
import collections
import json
import os

import timm
import torch
import torch.nn.functional as F

import overlock  # noqa: F401
from overlock import layers
from overlock.ops import depthwise_triton

from gpu_profile import events_ms  # noqa: E402  (benchmarks/, the script's folder)


def shapes_of_model(name):
    seen = collections.Counter()
    original = layers.depthwise_conv2d

    def record(x, weight, bias=None, padding=(0, 0), dilation=1):
        seen[(x.shape[1], x.shape[2], x.shape[3], weight.shape[-2], weight.shape[-1], tuple(padding), dilation)] += 1
        return original(x, weight, bias, padding, dilation)
    layers.depthwise_conv2d = record
    try:
        model = timm.create_model(name, use_ds=True).train()
        model(torch.randn(1, 3, 224, 224), return_aux=True)
    finally:
        layers.depthwise_conv2d = original
    return seen


def triton_error(c, h, w, k, pad, dil):
    """Largest relative error of the Triton output and gradients against cuDNN in float32 (TF32 off), batch 2."""
    torch.backends.cudnn.allow_tf32 = False
    x = torch.randn(2, c, h, w, device="cuda").contiguous(memory_format=torch.channels_last).requires_grad_()
    wt = torch.randn(c, 1, k, k, device="cuda", requires_grad=True)
    b = torch.randn(c, device="cuda", requires_grad=True)
    g = torch.randn(2, c, h, w, device="cuda")
    y = depthwise_triton.depthwise_conv2d(x, wt, b, pad, dil)
    r = F.conv2d(x, wt, b, padding=pad, dilation=dil, groups=c)
    ours = (y,) + torch.autograd.grad(y, (x, wt, b), g)
    ref = (r,) + torch.autograd.grad(r, (x, wt, b), g)
    torch.backends.cudnn.allow_tf32 = True
    return max(((a - e).norm() / e.norm()).item() for a, e in zip(ours, ref))


def per_shape(report, shapes, batch):
    rows = []
    totals = collections.Counter()
    for (c, h, w, kh, kw, pad, dil), n in sorted(shapes.items()):
        x = torch.randn(batch, c, h, w, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        wt = torch.randn(c, 1, kh, kw, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(batch, c, h, w, device="cuda", dtype=torch.bfloat16)
        row = dict(shape=f"{c}x{h}x{w} k{kh}x{kw} d{dil}", calls=n)
        for layout in ("channels_last", "nchw"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            xl = x.detach().contiguous(memory_format=fmt).requires_grad_()
            gl = g.contiguous(memory_format=fmt)
            for bench in (False, True):
                torch.backends.cudnn.benchmark = bench

                def run():
                    y = F.conv2d(xl, wt, None, padding=pad, dilation=dil, groups=c)
                    torch.autograd.grad(y, (xl, wt), gl)
                key = f"{layout}{'_bench' if bench else ''}"
                row[key] = events_ms(run, 2, 5)
                totals[key] += row[key] * n
        torch.backends.cudnn.benchmark = False
        xl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        gl = g.contiguous(memory_format=torch.channels_last)

        def run_triton():
            y = depthwise_triton.depthwise_conv2d(xl, wt, None, pad, dil)
            torch.autograd.grad(y, (xl, wt), gl)
        row["triton"] = events_ms(run_triton, 2, 5)
        totals["triton"] += row["triton"] * n
        row["triton_rel_err"] = triton_error(c, h, w, kh, pad, dil)
        rows.append(row)
        print(json.dumps(row), flush=True)
    report["depthwise_rows"] = rows
    report["depthwise_totals_ms_per_step"] = dict(totals)


def whole_step(report, name, batch):
    torch.manual_seed(0)
    model = timm.create_model(name, use_ds=True).cuda().train().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (batch,), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, aux = model(x, return_aux=True)
            loss = F.cross_entropy(logits, target) + 0.4 * F.cross_entropy(aux, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    original = layers.depthwise_conv2d
    # channels_last for all / an NCHW copy of the map for kernels >= 9 and dilated ones, with the model's weights
    # (their (C, 1, k, k) strides are channels_last: cuDNN then still runs channels_last) / the same with the
    # weights restrided NCHW
    for label, route in (("channels_last", None), ("nchw_k9_dilated", "model_weights"),
                         ("nchw_k9_dilated_nchw_weights", "nchw_weights"), ("triton", "triton"),
                         ("triton_k9_dilated", "triton_k9")):
        os.environ["OVERLOCK_GPU_DEPTHWISE"] = "triton" if route == "triton" else ""
        if route == "triton_k9":
            layers.depthwise_conv2d = _triton_route(original)
        else:
            layers.depthwise_conv2d = original if route in (None, "triton") else _nchw_route(original,
                                                                                             route == "nchw_weights")
        torch.cuda.reset_peak_memory_stats()
        key = f"step_{label}"
        report[key + "_ms"] = events_ms(step, 3, 7)
        report[key + "_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        print(key, report[key + "_ms"], flush=True)
    layers.depthwise_conv2d = original
    os.environ["OVERLOCK_GPU_DEPTHWISE"] = ""


def _triton_route(original, min_kernel: int = 9):
    """Large and dilated depthwise convs in the Triton kernels, the small ones in cuDNN."""
    def conv(x, weight, bias=None, padding=(0, 0), dilation=1):
        if max(weight.shape[-2:]) < min_kernel and dilation == 1:
            return original(x, weight, bias, padding, dilation)
        return depthwise_triton.depthwise_conv2d(x, weight, bias, padding, dilation)
    return conv


def _nchw_route(original, restride_weight: bool, min_kernel: int = 9):
    """Large and dilated depthwise convs on an NCHW copy of the map (after autocast's cast), output channels_last."""
    def conv(x, weight, bias=None, padding=(0, 0), dilation=1):
        if max(weight.shape[-2:]) < min_kernel and dilation == 1:
            return original(x, weight, bias, padding, dilation)
        if torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        if restride_weight:  # .contiguous() keeps a (C, 1, k, k) tensor's channels_last strides
            weight = weight.reshape(weight.shape[0], -1).view(weight.shape)
        y = F.conv2d(x.contiguous(), weight, bias, padding=padding, dilation=dilation, groups=weight.shape[0])
        return y.contiguous(memory_format=torch.channels_last)
    return conv


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--model", default="overlock_t")
    p.add_argument("--json")
    p.add_argument("--steps-only", action="store_true", help="only the whole-step comparison")
    args = p.parse_args()
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  cudnn=torch.backends.cudnn.version(), batch=args.batch, model=args.model)
    if not args.steps_only:
        per_shape(report, shapes_of_model(args.model), args.batch)
        print(json.dumps(report["depthwise_totals_ms_per_step"]), flush=True)
    whole_step(report, args.model, args.batch)
    from overlock.ops import _depthwise_triton_kernels as kernels  # the tile sizes the autotuner chose
    report["triton_configs"] = {name: {str(k): str(v) for k, v in fn.cache.items()}
                                for name, fn in (("forward", kernels.dw_forward),
                                                 ("weight_grad", kernels.dw_weight_grad))}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    for k, v in report.items():
        if k not in ("depthwise_rows", "triton_configs"):
            print(f"{k:40s} {v}")


if __name__ == "__main__":
    main()
