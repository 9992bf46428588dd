"""The hand-written GELU (ops/gelu.py, csrc/gelu_avx2.c): values and gradients against float64, dispatch, layouts."""
import pytest
import torch
import torch.nn.functional as F

from overlock.layers import GrnMlp
from overlock.ops import gelu as gelu_ops
from overlock.ops import native

from conftest import has_avx512f

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels {native.status()}")


def _inputs(n=200_003):
    torch.manual_seed(0)
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-3, -1e-3, 5.0, -5.0, 13.0, -13.0, 88.0, -88.0, 1e4, -1e4])
    return torch.cat([torch.randn(n) * 3, torch.linspace(-20, 20, 40_001), special])


def test_forward_matches_float64():
    x = _inputs()
    ref = F.gelu(x.double())
    out = native.gelu(x)
    err = (out.double() - ref).abs()
    assert err.max() < 1e-6 * x.abs().clamp_min(1).max()  # absolute, scaled by the largest input
    assert (err / x.double().abs().clamp_min(1)).max() < 6e-7
    # negative inputs: GELU -> 0 from below without the cancellation in 1 + erf(x / sqrt(2))
    tail = (x > -6) & (x < -3)
    rel = lambda y: ((y.double() - ref).abs() / ref.abs())[tail].max()  # noqa: E731
    assert rel(out) < 1e-2 and rel(out) < rel(F.gelu(x)) / 10
    assert (out - F.gelu(x)).abs().max() < 1e-6 * x.abs().clamp_min(1).max()


def test_backward_matches_float64():
    x = _inputs()
    g = torch.randn_like(x)
    xd = x.double().requires_grad_()
    F.gelu(xd).backward(g.double())
    got = native.gelu_backward(g, x)
    assert ((got.double() - xd.grad).abs() / g.double().abs().clamp_min(1)).max() < 1e-6


@pytest.mark.skipif(not has_avx512f(), reason="the CPU lacks AVX-512F: only the 8-lane code runs")
@pytest.mark.parametrize("offset", [0, 3, 8])
def test_16_lane_code_gives_the_bits_of_the_8_lane_code(offset):
    # groups of 8 lanes with and without a value below -3 (the forward's two forms), in every pairing within a
    # 16-lane vector, plus whatever the random and special inputs give; offset shifts where the vectors begin
    torch.manual_seed(1)
    halves = torch.randn(64, 8).abs() - 1.0
    halves[1::2, torch.randint(0, 8, (32,))] = -4.0 - torch.rand(32)
    mixed = torch.cat([halves.flatten(), halves.flip(0).flatten()])
    x = torch.cat([mixed, _inputs(100_003)])[offset:]
    g = torch.randn_like(x)
    wide, dwide = native.gelu(x), native.gelu_backward(g, x)
    with native.narrow_vectors():
        narrow, dnarrow = native.gelu(x), native.gelu_backward(g, x)
    assert torch.equal(wide, narrow) and torch.equal(dwide, dnarrow)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 15, 17, 40_001])
def test_lengths_that_are_not_whole_vectors_and_in_place(n):
    x = _inputs(n)[:n].clone()
    want = F.gelu(x.double())
    out = native.gelu(x.clone())
    assert (out.double() - want).abs().max() < 1e-6 * max(1.0, x.abs().max().item())
    y = x.clone()
    assert native.gelu(y, out=y) is y and torch.equal(y, out)
    g = torch.randn_like(x)
    ref = native.gelu_backward(g, x)
    assert native.gelu_backward(g, x, out=g) is g and torch.equal(g, ref)


def test_layouts_and_refusals():
    x = torch.randn(2, 16, 5, 7).contiguous(memory_format=torch.channels_last)
    out = native.gelu(x)
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.allclose(out, F.gelu(x), atol=1e-6)
    assert native.gelu(x.transpose(2, 3)) is None  # not dense in a memory format: caller falls back
    assert native.gelu(x.double()) is None
    assert native.gelu_backward(torch.randn(2, 16, 5, 7), x) is None  # strides differ


@pytest.fixture
def used(monkeypatch):
    """The model's GELUs use the kernel on this CPU whatever its ISA; counts the kernel calls."""
    calls = []
    real_f, real_b, real_cb, real_bf = native.gelu, native.gelu_backward, native.depthwise_gelu_grad, native.bias_gelu_
    monkeypatch.setattr(native, "NATIVE_ISAS", {native.cpu_isa()})
    monkeypatch.setattr(native, "gelu", lambda *a, **k: calls.append("f") or real_f(*a, **k))
    monkeypatch.setattr(native, "gelu_backward", lambda *a, **k: calls.append("b") or real_b(*a, **k))
    # GELU's backward folded into the input gradient of the conv after it (the GRN-MLP tail)
    monkeypatch.setattr(native, "depthwise_gelu_grad", lambda *a, **k: calls.append("cb") or real_cb(*a, **k))
    # GELU with the bias of the GEMM before it (the fused MLP's first 1x1)
    monkeypatch.setattr(native, "bias_gelu_", lambda *a, **k: calls.append("bf") or real_bf(*a, **k))
    return calls


def test_module_gradients_and_fallbacks(used):
    torch.manual_seed(0)
    act = gelu_ops.GELU()
    x = torch.randn(3, 8, 6, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(3, 8, 6, 5)
    act(x).backward(g)
    assert used == ["f", "b"]
    xd = x.detach().double().requires_grad_()
    F.gelu(xd).backward(g.double())
    assert (x.grad.double() - xd.grad).abs().max() < 1e-6
    used.clear()
    assert torch.equal(gelu_ops.gelu(x.detach().double()), F.gelu(x.detach().double()))  # float64: PyTorch's
    assert torch.equal(gelu_ops.gelu(x.detach(), "tanh"), F.gelu(x.detach(), approximate="tanh"))
    assert used == []


def test_grn_mlp_uses_the_kernel_in_every_path(used, monkeypatch):
    """Plain graph, recomputation in backward and the fused inference form compute the same GELU."""
    torch.manual_seed(0)
    mlp = GrnMlp(8, 32).to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    out = mlp(x.requires_grad_())
    out.backward(torch.randn_like(out))
    # forward, the rebuild in backward, the gradient (in the conv's input-gradient pass)
    assert used.count("f") == 2 and used.count("cb") == 1 and "b" not in used
    used.clear()
    with torch.no_grad():
        fused = mlp.fuse()(x)
    assert used == ["bf"]
    torch.testing.assert_close(fused, out.detach(), rtol=1e-5, atol=1e-5)
