"""The Triton depthwise kernels for GPUs (opt-in: ``OVERLOCK_GPU_DEPTHWISE=triton``), run on the CPU by Triton's
interpreter: values and all three gradients against float64 ``F.conv2d``, through the library's own route."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from overlock.ops import depthwise_triton

pytestmark = pytest.mark.skipif(not depthwise_triton.available(), reason="triton is not installed")

SCRIPT = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from overlock.layers import depthwise_conv
    from overlock.ops import depthwise_triton
    torch.manual_seed(0)
    # (N, C, H, W, k, dilation, bias): channels not a multiple of the channel block, non-square maps, dilation,
    # a kernel wider than the map (cropped by depthwise_conv)
    for N, C, H, W, k, d, bias in [(2, 40, 9, 11, 5, 1, True), (1, 16, 7, 6, 3, 2, False),
                                   (1, 32, 12, 9, 3, 3, True), (2, 24, 4, 5, 9, 1, True)]:
        x = torch.randn(N, C, H, W, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
        w, b, g = torch.randn(C, 1, k, k, dtype=torch.float64), torch.randn(C, dtype=torch.float64), torch.randn_like(x)
        ours = [t.float().requires_grad_() for t in (x, w, b)]
        ref = [t.clone().requires_grad_() for t in (x, w, b)]
        assert depthwise_triton.enabled(ours[0])
        y = depthwise_conv(ours[0], ours[1], ours[2] if bias else None, dilation=d)
        r = F.conv2d(ref[0], ref[1], ref[2] if bias else None, padding=d * (k // 2), dilation=d, groups=C)
        n = 3 if bias else 2
        got = torch.autograd.grad(y, ours[:n], g.float())
        want = torch.autograd.grad(r, ref[:n], g)
        assert y.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last)
        for a, e in zip((y,) + got, (r,) + want):
            err = ((a.double() - e).norm() / e.norm()).item()
            assert err < 1e-6, (N, C, H, W, k, d, err)
    # every tile configuration the GPU autotuner may pick, on a map smaller than some tiles
    from overlock.ops import _depthwise_triton_kernels as K
    x = torch.randn(2, 24, 6, 7).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(24, 1, 3, 3, requires_grad=True)
    g = torch.randn(2, 24, 6, 7)
    want = (F.conv2d(x, w, padding=2, dilation=2, groups=24),)
    want += torch.autograd.grad(want[0], (x, w), g)
    for fwd, wgrad in zip(K.ALL_FORWARD_CONFIGS, K.ALL_WEIGHT_GRAD_CONFIGS + K.ALL_WEIGHT_GRAD_CONFIGS[:1]):
        K.dw_forward.configs, K.dw_weight_grad.configs = [fwd], [wgrad]
        y = depthwise_triton.depthwise_conv2d(x, w, None, (2, 2), 2)
        for a, e in zip((y,) + torch.autograd.grad(y, (x, w), g), want):
            assert ((a - e).norm() / e.norm()).item() < 1e-6, (fwd, wgrad)
    print("ok")
""")


def test_values_and_gradients_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", OVERLOCK_GPU_DEPTHWISE="triton")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_off_unless_asked_for_and_never_on_plain_cpu(monkeypatch):
    x = torch.randn(1, 8, 6, 6)
    monkeypatch.delenv("OVERLOCK_GPU_DEPTHWISE", raising=False)
    assert not depthwise_triton.enabled(x)
    monkeypatch.setenv("OVERLOCK_GPU_DEPTHWISE", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not depthwise_triton.enabled(x)  # a CPU tensor needs the interpreter
