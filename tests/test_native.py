"""The hand-written depthwise kernels (ops/native.py, csrc/depthwise_avx2.c, csrc/depthwise_avx512.c): values,
gradients, dispatch."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from overlock import OverLoCK, load_into
from overlock.layers import DilatedReparamBlock, depthwise_conv
from overlock.ops import depthwise, native

from conftest import DATA, has_avx512f, rel_err

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels {native.status()}")


def cl(t):
    return t.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape,kernel", [
    ((1, 64, 56, 56), (17, 17)),   # stage 1 at 224
    ((2, 32, 14, 14), (13, 13)),   # 16-channel blocks, kernel almost the map
    ((3, 24, 9, 11), (5, 3)),      # 8-channel blocks, non-square kernel and map
    ((1, 8, 4, 3), (17, 17)),      # kernel far larger than the map: only the centre taps land
    ((2, 16, 7, 13), (3, 3)),      # width not a multiple of the 6-pixel tile
    ((2, 24, 5, 9), (3, 3)),       # few taps (every channel block per tile), 8-channel blocks
    ((1, 48, 1, 1), (7, 7)),
])
@pytest.mark.parametrize("with_bias", [True, False])
def test_values_match_float64_conv(shape, kernel, with_bias):
    torch.manual_seed(0)
    x = cl(torch.randn(shape))
    w = torch.randn(shape[1], 1, *kernel)
    b = torch.randn(shape[1]) if with_bias else None
    out = native.depthwise_conv2d_same(x, w, b)
    ref = F.conv2d(x.double(), w.double(), None if b is None else b.double(),
                   padding=(kernel[0] // 2, kernel[1] // 2), groups=shape[1])
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, ref) < 1e-6


@pytest.mark.skipif(not has_avx512f(), reason="the CPU lacks AVX-512F: only the 256-bit loop runs")
@pytest.mark.parametrize("shape,kernel,dilation", [
    ((2, 64, 56, 56), (17, 17), 1), ((1, 32, 13, 29), (13, 13), 1), ((2, 16, 11, 25), (7, 5), 2),
    ((1, 48, 9, 7), (15, 15), 1), ((1, 16, 30, 30), (5, 5), 3),
])
@pytest.mark.parametrize("flip", [False, True])
def test_512_bit_loops_give_the_bits_of_the_256_bit_ones(shape, kernel, dilation, flip):
    torch.manual_seed(0)
    x = cl(torch.randn(shape))
    w = torch.randn(shape[1], 1, *kernel)
    b = torch.randn(shape[1])
    g = cl(torch.randn(shape))
    wide = native.depthwise_conv2d_same(x, w, b, dilation, flip=flip)
    dw_wide = native.depthwise_weight_grad_same(x, g, kernel, dilation)
    with native.narrow_vectors():
        narrow = native.depthwise_conv2d_same(x, w, b, dilation, flip=flip)
        dw_narrow = native.depthwise_weight_grad_same(x, g, kernel, dilation)
    again = native.depthwise_conv2d_same(x, w, b, dilation, flip=flip)  # the setting is restored on exit
    assert torch.equal(wide, narrow) and torch.equal(wide, again) and torch.equal(dw_wide, dw_narrow)
    ref = F.conv2d(x.double(), (w.flip(-1, -2) if flip else w).double(), b.double(),
                   padding=(dilation * (kernel[0] // 2), dilation * (kernel[1] // 2)), dilation=dilation,
                   groups=shape[1])
    assert rel_err(wide, ref) < 1e-6


@pytest.mark.skipif(not has_avx512f(), reason="the CPU lacks AVX-512F: only the 256-bit loop runs")
@pytest.mark.parametrize("C", [32, 40])  # 40: a 16-lane prefix of each tile, then 8 lanes
def test_512_bit_gelu_epilogues_give_the_bits_of_the_256_bit_ones(C):
    torch.manual_seed(0)
    x = cl(torch.randn(2, C, 9, 11) * 4)  # values below -3 too: GELU's other formula
    g, u = cl(torch.randn(2, C, 9, 11)), cl(torch.randn(2, C, 9, 11) * 4)
    w, b = torch.randn(C, 1, 3, 3), torch.randn(C)
    taps = native._taps(w)
    wide = native.depthwise_conv2d_taps_gelu(x, taps, b, 3, 3), native.depthwise_gelu_grad(g, w, u)
    with native.narrow_vectors():
        narrow = native.depthwise_conv2d_taps_gelu(x, taps, b, 3, 3), native.depthwise_gelu_grad(g, w, u)
    assert all(torch.equal(a, n) for a, n in zip(wide, narrow))
    assert torch.equal(wide[0], native.gelu(native.depthwise_conv2d_same(x, w, b)))


def test_unsupported_shapes_are_declined():
    x = cl(torch.randn(1, 12, 8, 8))
    assert native.depthwise_conv2d_same(x, torch.randn(12, 1, 3, 3)) is None          # 12 channels
    x16 = cl(torch.randn(1, 16, 8, 8))
    assert native.depthwise_conv2d_same(x16, torch.randn(16, 1, 4, 4)) is None        # even kernel
    assert native.depthwise_conv2d_same(x16.double(), torch.randn(16, 1, 3, 3).double()) is None
    with native.disabled():
        assert not native.available() and native.depthwise_conv2d_same(x16, torch.randn(16, 1, 3, 3)) is None


@pytest.fixture
def forced(monkeypatch):
    """The kernel used by the model's convs on this CPU whatever its ISA; counts the calls."""
    calls = []
    real = native.depthwise_conv2d_same

    def spy(x, w, b=None, dilation=1, flip=False, out=None):
        y = real(x, w, b, dilation, flip, out=out)
        calls.append(y is not None)
        return y

    monkeypatch.setattr(native, "NATIVE_ISAS", {native.cpu_isa()})
    monkeypatch.setattr(native, "depthwise_conv2d_same", spy)
    return calls


@pytest.mark.parametrize("kernel,dilation,size", [(13, 1, 14), (3, 1, 9), (3, 5, 20), (9, 2, 16), (3, 7, 40),
                                                   (5, 3, 11)])
def test_training_gradients_match_float64(forced, kernel, dilation, size):
    """Forward and input gradient by the kernel (the gradient is the conv with the kernel turned 180 degrees),
    dilated convs included (directly on the map, any map size, weight gradient by the kernel too)."""
    torch.manual_seed(0)
    x = cl(torch.randn(2, 16, size, size)).requires_grad_()
    w = torch.randn(16, 1, kernel, kernel, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    g = cl(torch.randn(2, 16, size, size))
    out = depthwise_conv(x, w, b, dilation=dilation)
    grads = torch.autograd.grad(out, (x, w, b), g)
    assert len(forced) >= 2 and all(forced), "forward and input gradient did not both run in the kernel"
    assert type(out.grad_fn).__name__ == "_DepthwiseConvBackward"
    x2, w2, b2 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = F.conv2d(x2, w2, b2, padding=dilation * (kernel // 2), dilation=dilation, groups=16)
    assert rel_err(out, ref) < 1e-6
    for got, want in zip(grads, torch.autograd.grad(ref, (x2, w2, b2), g.double())):
        assert rel_err(got, want) < 1e-6


@pytest.mark.parametrize("shape,kernel,dilation", [
    ((8, 32, 14, 14), 13, 1),   # kernel almost the map: partial sums per image
    ((2, 64, 56, 56), 17, 1),   # 16-channel blocks, images cut into row chunks for the threads
    ((1, 24, 50, 45), 5, 3),    # one image cut into row chunks, 8-channel blocks, dilated
    ((3, 16, 33, 31), 7, 1),    # chunk rows not a multiple of anything
    ((2, 48, 9, 11), 3, 1),     # 3x3 (the native weight gradient of the small kernels too)
])
def test_weight_gradient_matches_float64(shape, kernel, dilation):
    """The weight-gradient kernel: partial sums per (channel block, image, row chunk), added in a fixed order."""
    torch.manual_seed(0)
    x, g = cl(torch.randn(shape)), cl(torch.randn(shape))
    got = native.depthwise_weight_grad_same(x, g, (kernel, kernel), dilation)
    w = torch.zeros(shape[1], 1, kernel, kernel, dtype=torch.float64)
    want = torch.ops.aten.convolution_backward(
        g.double(), x.double(), w, None, [1, 1], [dilation * (kernel // 2)] * 2, [dilation, dilation], False, [0, 0],
        shape[1], [False, True, False])[1]
    assert got.shape == want.shape and rel_err(got, want) < 1e-6


def test_reparam_block_trains_as_with_pytorch_kernels(forced):
    torch.manual_seed(0)
    block = DilatedReparamBlock(16, 13).train()
    x = cl(torch.randn(2, 16, 16, 16)).requires_grad_()
    block(x).square().sum().backward()
    ours = {n: p.grad.clone() for n, p in block.named_parameters()} | {"x": x.grad.clone()}
    assert any(forced)
    block.zero_grad()
    x.grad = None
    with native.disabled():
        block(x).square().sum().backward()
    theirs = {n: p.grad for n, p in block.named_parameters()} | {"x": x.grad}
    # the BatchNorm biases' gradients are zero in exact arithmetic here (the loss is centred per channel): float
    # noise in both runs, compared against the largest gradient
    scale = max(t.abs().max().item() for t in theirs.values())
    for n in ours:
        assert rel_err(ours[n], theirs[n]) < 1e-5 or (ours[n] - theirs[n]).abs().max() < 1e-7 * scale, n


@pytest.mark.parametrize("path,deploy,key", [("classification.pth", False, "logits"),
                                              ("classification_reparam.pth", True, "logits_reparam")])
def test_official_tiny_model_logits(forced, tiny_config, expected, path, deploy, key):
    model = OverLoCK(**tiny_config, deploy=deploy).eval().to(memory_format=torch.channels_last)
    load_into(model, DATA / path)
    with torch.no_grad():
        for i in (0, 1):
            assert rel_err(model(cl(expected[f"input_{i}"])), expected[f"{key}_{i}"]) < 1e-5
    assert sum(forced) >= 4


def test_nchw_maps_keep_pytorch_kernels_and_layout(forced):
    x, w = torch.randn(1, 16, 10, 10), torch.randn(16, 1, 5, 5)
    out = depthwise_conv(x, w)
    assert not forced and out.is_contiguous()


def _fresh_status(env):
    code = "from overlock.ops import native; print(native.status())"
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_switch_and_build_failure_fall_back_with_a_reason(tmp_path):
    assert _fresh_status({"OVERLOCK_NATIVE": "0"}) == "off (OVERLOCK_NATIVE=0)"
    line = _fresh_status({"CC": "false", "OVERLOCK_CACHE": str(tmp_path)})
    sources = ("depthwise_avx2.c, depthwise_avx512.c, neighborhood_avx2.c, neighborhood_avx512.c, grn_avx2.c, "
               "gelu_avx2.c, gelu_avx512.c, se_avx2.c, batchnorm_avx2.c, concat_avx2.c, blocks_avx2.c")
    assert line.startswith(f"off (building {sources} with false failed"), line
    built = _fresh_status({"OVERLOCK_CACHE": str(tmp_path)})
    assert built.startswith("on (") and str(tmp_path) in built


@pytest.mark.parametrize("B,G,H,W,c,C,k", [(2, 3, 9, 11, 16, 16, 5), (1, 2, 7, 7, 8, 24, 7), (2, 2, 14, 14, 4, 8, 13),
                                           (1, 1, 13, 16, 3, 16, 13)])
def test_fused_aggregation_matches_float64(B, G, H, W, c, C, k):
    """softmax(q @ keys + bias) over each pixel's NATTEN window (shifted at the borders), times the values."""
    from overlock.ops.neighborhood import na2d_av
    torch.manual_seed(0)
    q = torch.randn(B, H * W, G, c).transpose(1, 2)  # strided as ContMix's NHWC queries
    keys = torch.randn(B, G, c, 9 + k * k)[..., 9:]  # a slice of a wider product
    bias, v = torch.randn(G, H * W, k * k), torch.randn(B, H, W, G, C).permute(0, 3, 1, 2, 4)  # strided heads
    out = torch.full((B, G, H, W, C), float("nan"))
    assert native.na2d_softmax_av(q, keys, bias, v, k, out)
    attn = (q.double() @ keys.double() + bias.double()).softmax(-1).reshape(B, G, H, W, k * k)
    assert rel_err(out, na2d_av(attn, v.double(), k, "naive")) < 1e-6
    same = torch.full_like(out, float("nan"))
    assert native.na2d_softmax_av(q.contiguous(), keys.contiguous(), bias, v.contiguous(), k, same)
    assert torch.equal(out, same)  # strides change the addresses, not the arithmetic
    assert not native.na2d_softmax_av(q, keys, bias, v[..., :4], k, out[..., :4])  # 4 channels: declined


@pytest.mark.skipif(not has_avx512f(), reason="the CPU lacks AVX-512F: only the 256-bit code runs")
@pytest.mark.parametrize("H,W,c,C,ks,kl", [
    (14, 14, 16, 16, 5, 13),  # overlock_t's stride-16 maps: windows clamped at both borders, shifts 0 and 1
    (7, 7, 16, 16, 5, 7),  # stride 32: every large window the whole map; two pixels, two more, one alone
    (9, 18, 5, 32, 3, 9),  # odd query channels, two 16-channel blocks, interior quads (shifts 1, 1, 2)
    (17, 19, 16, 24, 7, 17),  # 24 channels: the 256-bit code alone; 17x17 windows
])
def test_512_bit_aggregation_gives_the_bits_of_the_256_bit_one(H, W, c, C, ks, kl):
    """The 16-lane ContMix aggregation (two pixel pairs at a time) against the 8-lane one, bit for bit."""
    from overlock.ops.neighborhood import na2d_av
    torch.manual_seed(0)
    B, G = 2, 3
    q = torch.randn(B, H * W, G, c).transpose(1, 2) * 2  # logits spread widely: exponentials down to underflow
    keys = torch.randn(B, G, c, ks * ks + kl * kl)
    biases = torch.randn(G, H * W, ks * ks), torch.randn(G, H * W, kl * kl)
    v = torch.randn(B, H, W, 2, G, C).permute(3, 0, 4, 1, 2, 5)
    args = q, keys[..., :ks * ks], keys[..., ks * ks:], *biases, v, ks, kl
    wide, narrow = (torch.full((2, B, G, H, W, C), float("nan")) for _ in range(2))
    assert native.na2d_softmax_av_pair(*args, wide)
    with native.narrow_vectors():
        assert native.na2d_softmax_av_pair(*args, narrow)
    assert torch.equal(wide, narrow)
    for half, k in enumerate((ks, kl)):
        keys_half = args[1 + half].double()
        attn = (q.double() @ keys_half + biases[half].double()).softmax(-1).reshape(B, G, H, W, k * k)
        assert rel_err(wide[half], na2d_av(attn, v[half].double(), k, "naive")) < 1e-6


def test_both_aggregations_in_one_call_give_the_bits_of_two():
    """``na2d_softmax_av_pair`` (ContMix's small and large windows in one parallel pass) against one call each."""
    torch.manual_seed(0)
    B, G, H, W, c, C, ks, kl = 2, 3, 13, 14, 16, 16, 5, 13
    q = torch.randn(B, H * W, G, c).transpose(1, 2)
    keys = torch.randn(B, G, c, ks * ks + kl * kl)
    biases = torch.randn(G, H * W, ks * ks), torch.randn(G, H * W, kl * kl)
    v = torch.randn(B, H, W, 2, G, C).permute(3, 0, 4, 1, 2, 5)
    out = torch.full((B, H, W, 2, G, C), float("nan")).permute(3, 0, 4, 1, 2, 5)
    assert native.na2d_softmax_av_pair(q, keys[..., :ks * ks], keys[..., ks * ks:], *biases, v, ks, kl, out)
    for half, (k, keys_half) in enumerate([(ks, keys[..., :ks * ks]), (kl, keys[..., ks * ks:])]):
        one = torch.full_like(out[half], float("nan"))
        assert native.na2d_softmax_av(q, keys_half, biases[half], v[half], k, one)
        assert torch.equal(out[half], one)
    assert not native.na2d_softmax_av_pair(q, keys[..., :ks * ks], keys[..., ks * ks:].contiguous(), *biases, v, ks,
                                           kl, out)  # the two keys must share strides


@pytest.mark.parametrize("H,W,ks,kl", [(14, 14, 5, 13), (7, 9, 3, 7), (20, 17, 7, 17)])
def test_biases_summed_from_the_tables_give_the_bits_of_the_per_pixel_array(H, W, ks, kl):
    """At inference the kernel sums each pixel's window biases from the position tables and the projection's bias
    (no (G, H*W, k*k) array per block): the bits of ``contmix.window_biases`` read per pixel."""
    from overlock.contmix import window_biases
    torch.manual_seed(0)
    B, G, c, C = 2, 3, 16, 16
    q = torch.randn(B, H * W, G, c).transpose(1, 2)
    keys = torch.randn(B, G, c, ks * ks + kl * kl)
    tables = torch.randn(G, 2 * ks - 1, 2 * ks - 1), torch.randn(G, 2 * kl - 1, 2 * kl - 1)
    proj_bias = torch.randn(ks * ks + kl * kl)
    v = torch.randn(B, H, W, 2, G, C).permute(3, 0, 4, 1, 2, 5)
    args = q, keys[..., :ks * ks], keys[..., ks * ks:]
    summed, read = (torch.full((2, B, G, H, W, C), float("nan")) for _ in range(2))
    assert native.na2d_softmax_av_pair(*args, *tables, v, ks, kl, summed,
                                       proj_bias=(proj_bias[:ks * ks], proj_bias[ks * ks:]))
    assert native.na2d_softmax_av_pair(*args, *window_biases(*tables, proj_bias, H, W, ks, kl), v, ks, kl, read)
    assert torch.equal(summed, read)


def test_context_mix_block_uses_the_fused_kernel(forced, expected, monkeypatch):
    """The official tiny ContMix block's outputs with the fused aggregation (channels_last maps, inference)."""
    import json

    from overlock import ContMixBlock
    calls = []
    real = native.na2d_softmax_av_pair
    monkeypatch.setattr(native, "na2d_softmax_av_pair", lambda *a, **k: calls.append(1) or real(*a, **k))
    block = ContMixBlock(**json.loads((DATA / "contmix_config.json").read_text())).eval()
    block.load_state_dict(torch.load(DATA / "contmix_block.pth", weights_only=True)["state_dict"])
    block = block.to(memory_format=torch.channels_last)
    with torch.no_grad():
        for i in (0, 1):  # input 1 (9x11) is smaller than the 13x13 kernel
            got = block(cl(expected[f"contmix_input_{i}"]))
            assert rel_err(got, expected[f"contmix_output_{i}"]) < 1e-5
    assert calls


@pytest.mark.parametrize("kernel,size", [(3, 14), (3, 60), (3, 120), (13, 20)])
def test_an_image_gets_the_same_bits_alone_or_in_a_batch(forced, kernel, size):
    """The kernel choice depends on the map, not the batch (3x3 runs natively on small maps only)."""
    torch.manual_seed(0)
    x = cl(torch.randn(3, 16, size, size))
    w, b = torch.randn(16, 1, kernel, kernel), torch.randn(16)
    with torch.no_grad():
        assert torch.equal(depthwise_conv(x, w, b)[1:2], depthwise_conv(x[1:2], w, b))
    assert all(forced) and bool(forced) == (kernel > 3 or depthwise._small_map(x))


def test_weights_updated_by_a_fused_optimizer_are_seen():
    """Fused AdamW writes parameters without moving their version counter: the kernel must read the weight as it
    is now (a validation pass after each training step, as in the trainers)."""
    torch.manual_seed(0)
    x = cl(torch.randn(2, 16, 9, 9))
    w = torch.nn.Parameter(torch.randn(16, 1, 5, 5))
    opt = torch.optim.AdamW([w], lr=0.5, **({"fused": True} if hasattr(torch, "_fused_adamw_") else {}))
    with torch.no_grad():
        before = native.depthwise_conv2d_same(x, w)
    w.grad = torch.randn_like(w)
    opt.step()
    with torch.no_grad():
        after = native.depthwise_conv2d_same(x, w)
    assert rel_err(after, F.conv2d(x.double(), w.detach().double(), padding=2, groups=16)) < 1e-6
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("shape", [(1, 768, 14, 14), (3, 24, 5, 7), (2, 40, 1, 1), (2, 64, 33, 17)])
def test_grn_scale_matches_float64(shape):
    """GRN's per-sample scale ``1 + gamma * nx`` in one pass (fused models): PyTorch's formula in float64."""
    from overlock.layers import GRN
    torch.manual_seed(0)
    x = cl(torch.randn(shape) * 3)
    grn = GRN(shape[1])
    with torch.no_grad():
        grn.gamma.normal_()
        got = native.grn_scale(x, grn.gamma)
        ref = grn.gamma.double() * grn.double().response(x.double()) + 1
    assert got.shape == (shape[0], shape[1], 1, 1) and rel_err(got, ref) < 1e-6


def test_grn_scale_declines_what_it_does_not_cover():
    gamma = torch.randn(1, 16, 1, 1)
    assert native.grn_scale(torch.randn(2, 16, 5, 5), gamma) is None                  # NCHW
    assert native.grn_scale(cl(torch.randn(2, 12, 5, 5)), torch.randn(1, 12, 1, 1)) is None  # 12 channels
    x = cl(torch.randn(2, 16, 5, 5)).requires_grad_()
    assert native.grn_scale(x, gamma) is None                                          # autograd
    with torch.no_grad():
        assert native.grn_scale(x, gamma) is not None


@pytest.mark.parametrize("kernel,size", [(3, 14), (3, 60), (3, 120), (3, 240), (13, 7), (17, 5), (7, 1)])
def test_fused_depthwise_conv_calls_the_kernel_directly(forced, monkeypatch, kernel, size):
    """A fused model's depthwise conv without autograd: the kernel with the kept tap layout, the very bits of the
    generic route (which crops kernels larger than the map), and the generic route where that uses oneDNN
    (3x3 on 16x240x240)."""
    from overlock.fused import DepthwiseConv
    direct = []
    real = native.depthwise_conv2d_taps
    monkeypatch.setattr(native, "depthwise_conv2d_taps", lambda *a: direct.append(1) or real(*a))
    torch.manual_seed(0)
    conv = DepthwiseConv(16, 16, kernel, padding=kernel // 2, groups=16).eval()
    x = cl(torch.randn(2, 16, size, size))
    with torch.no_grad():
        got = conv(x)
        want = depthwise_conv(x, conv.weight, conv.bias)
    assert bool(direct) == (kernel > 3 or size < 240) == (kernel > 3 or depthwise._small_map(x))
    assert torch.equal(got, want) and got.is_contiguous(memory_format=torch.channels_last)
    ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=kernel // 2, groups=16)
    assert rel_err(got, ref) < 1e-6


def test_fused_depthwise_conv_follows_its_weight(forced):
    """The kept tap layout is rebuilt after an in-place edit or a load, and after a fused optimizer step (which
    does not move version counters) once ``eval()`` runs; with autograd on, the generic route runs."""
    from overlock.fused import DepthwiseConv
    torch.manual_seed(0)
    conv = DepthwiseConv(16, 16, 5, padding=2, groups=16).eval()
    x = cl(torch.randn(1, 16, 9, 9))

    def check():
        with torch.no_grad():
            out = conv(x)
        assert rel_err(out, F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=2, groups=16)) < 1e-6
    check()
    with torch.no_grad():
        conv.weight.mul_(-2)
    check()
    conv.load_state_dict({"weight": torch.randn(16, 1, 5, 5), "bias": torch.randn(16)})
    check()
    opt = torch.optim.AdamW(conv.parameters(), lr=0.5, **({"fused": True} if hasattr(torch, "_fused_adamw_") else {}))
    conv.train()
    out = conv(x)
    assert out.grad_fn is not None
    out.square().sum().backward()
    opt.step()
    conv.eval()
    check()


@pytest.mark.parametrize("C,size", [(16, 14), (24, 9), (64, 5), (40, 6)])
def test_fused_conv_then_layer_norm_in_one_call(forced, monkeypatch, C, size):
    """A fused block's 3x3 conv followed by its LayerNorm: one kernel call giving the conv's very bits and the norm
    to float rounding; two plain calls where a hook, autograd or a larger kernel is in the way."""
    from overlock.fused import DepthwiseConv
    from overlock.layers import LayerNorm2d
    calls = []
    real = native.depthwise_conv2d_taps_norm
    monkeypatch.setattr(native, "depthwise_conv2d_taps_norm", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    conv, norm = DepthwiseConv(C, C, 3, padding=1, groups=C).eval(), LayerNorm2d(C)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = cl(torch.randn(2, C, size, size + 3))
    with torch.no_grad():
        y, z = conv.forward_norm(x, norm)
        assert calls and torch.equal(y, conv(x)) and z.is_contiguous(memory_format=torch.channels_last)
        ref = F.layer_norm(y.double().permute(0, 2, 3, 1), (C,), norm.weight.double(), norm.bias.double(), 1e-6)
        assert rel_err(z, ref.permute(0, 3, 1, 2)) < 1e-6
        seen = []
        handle = norm.register_forward_hook(lambda *a: seen.append(1))
        calls.clear()
        assert torch.equal(conv.forward_norm(x, norm)[1], norm(y)) and not calls and seen
        handle.remove()
        wide = DepthwiseConv(C, C, 5, padding=2, groups=C).eval()
        assert torch.equal(wide.forward_norm(x, norm)[1], norm(wide(x))) and not calls
    y, z = conv.forward_norm(x, norm)  # autograd on: differentiable, two calls
    assert not calls and z.grad_fn is not None and torch.allclose(z, norm(conv(x)))


@pytest.mark.parametrize("affine", ["both", "scale", "shift"])
def test_conv_then_norm_prepares_the_identity_with_pytorchs_bits(forced, affine):
    """The residual identity ``y * scale + shift`` written in the conv-then-norm call (LayerScale and the branch's
    last bias): the norm of the plain ``y``, and the bits of ``addcmul`` / ``mul`` / ``add`` on ``y``."""
    from overlock.fused import DepthwiseConv
    from overlock.layers import LayerNorm2d
    torch.manual_seed(0)
    C = 24
    conv, norm = DepthwiseConv(C, C, 3, padding=1, groups=C).eval(), LayerNorm2d(C)
    x = cl(torch.randn(2, C, 9, 12))
    scale = torch.randn(C) if affine != "shift" else None
    shift = torch.randn(C) if affine != "scale" else None
    with torch.no_grad():
        y, z = conv.forward_norm(x, norm)
        got, z2 = conv.forward_norm_identity(x, norm, scale, shift)
        want = {"both": lambda: torch.addcmul(shift.view(1, C, 1, 1), y, scale.view(1, C, 1, 1)),
                "scale": lambda: y * scale.view(1, C, 1, 1), "shift": lambda: y + shift.view(1, C, 1, 1)}[affine]()
        assert torch.equal(z2, z) and torch.equal(got, want)
    assert conv.forward_norm_identity(x, norm, scale, shift) is None  # autograd on: left to the caller


def test_fused_conv_then_gelu_in_one_call(forced, monkeypatch):
    """The Focus-Net block's 3x3 conv + exact GELU: one kernel call with the very bits of the conv kernel followed by
    the GELU kernel (including values below -3, which take GELU's other formula); the two calls otherwise."""
    from overlock.fused import DepthwiseConv
    calls = []
    real = native.depthwise_conv2d_taps_gelu
    monkeypatch.setattr(native, "depthwise_conv2d_taps_gelu", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    conv = DepthwiseConv(24, 24, 3, padding=1, groups=24).eval()
    x = cl(torch.randn(2, 24, 9, 11) * 4)
    with torch.no_grad():
        got, plain = conv.forward_gelu(x), conv(x)
        assert calls and (plain < -3).any() and torch.equal(got, native.gelu(plain))
        assert rel_err(got, F.gelu(plain.double())) < 1e-6
        calls.clear()
        assert torch.equal(conv.forward_gelu(x, "tanh"), F.gelu(plain, approximate="tanh")) and not calls
        handle = conv.register_forward_hook(lambda *a: None)
        assert torch.equal(conv.forward_gelu(x), got) and not calls
        handle.remove()


@pytest.mark.parametrize("C", [24, 72])
def test_fused_conv_then_grn_scale_in_one_call(forced, monkeypatch, C):
    """A fused GRN-MLP's 3x3 conv + GRN's per-sample scale: one kernel call, the conv's very bits, the scale to float
    rounding of float64, the same for an image alone or in a batch; the two calls where a hook is in the way."""
    from overlock.fused import DepthwiseConv, grn_scale
    calls = []
    real = native.depthwise_conv2d_taps_grn
    monkeypatch.setattr(native, "depthwise_conv2d_taps_grn", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    conv, gamma = DepthwiseConv(C, C, 3, padding=1, groups=C).eval(), torch.rand(C)
    x = cl(torch.randn(3, C, 10, 13))
    with torch.no_grad():
        y, scale = conv.forward_grn(x, gamma)
        assert calls and torch.equal(y, conv(x)) and scale.shape == (3, C, 1, 1)
        gx = y.double().square().sum((2, 3), keepdim=True).sqrt()
        assert rel_err(scale, 1 + gamma.double().view(1, -1, 1, 1) * gx / (gx.mean(1, keepdim=True) + 1e-6)) < 1e-6
        assert torch.equal(conv.forward_grn(x[1:2], gamma)[1], scale[1:2])
        applied, none = conv.forward_grn(x, gamma, apply=True)  # the scale applied in the same call
        assert none is None and torch.equal(applied, y * scale)
        calls.clear()
        handle = conv.register_forward_hook(lambda *a: None)
        y2, scale2 = conv.forward_grn(x, gamma)
        assert not calls and torch.equal(y2, y) and torch.equal(scale2, grn_scale(gamma, y))
        handle.remove()


@pytest.mark.parametrize("C,size", [(64, (9, 11)), (24, (5, 4))])
def test_se_gate_in_one_call(monkeypatch, C, size):
    """The fused SE's gate, sigmoid(fc2(GELU(fc1(mean)))), by one kernel call: float64's values to float rounding;
    PyTorch's ops where it declines (autograd, not channels_last); the fused module calls it."""
    from overlock.fused import FusedSE
    from overlock.layers import SEModule
    torch.manual_seed(0)
    se = FusedSE(SEModule(C).eval())
    with torch.no_grad():
        for p in se.parameters():
            p.normal_()
    x = cl(torch.randn(2, C, *size) * 2)
    args = (se.fc1_weight, se.fc1_bias, se.fc2_weight, se.fc2_bias)
    real = native.se_gate
    with torch.no_grad():
        gate = native.se_gate(x, *args)
        d = [t.double() for t in args]
        want = torch.sigmoid(F.linear(F.gelu(F.linear(x.double().mean((2, 3)), d[0], d[1])), d[2], d[3]))
        assert gate.shape == (2, C, 1, 1) and rel_err(gate.flatten(1), want) < 1e-6
        assert native.se_gate(x.contiguous(), *args) is None and native.se_gate(x[:, :4], *args) is None
        calls = []
        monkeypatch.setattr(native, "NATIVE_ISAS", {native.cpu_isa()})
        monkeypatch.setattr(native, "se_gate", lambda *a: calls.append(1) or gate)
        assert se.scale(x) is gate and calls
    assert real(x, *args) is None  # autograd on: the parameters require gradients


def test_fused_depthwise_conv_decides_per_call(forced, monkeypatch):
    """The route a fused depthwise conv keeps for one kind of input is not reused for another: one module fed a
    channels_last map (the kernel), the same map NCHW, a map over the fused 3x3 limit (oneDNN), with the kernels
    switched off and with autograd on; each result is the conv, and the kernel runs exactly where it applies."""
    from overlock.fused import DepthwiseConv
    direct = []
    real = native.depthwise_conv2d_taps
    monkeypatch.setattr(native, "depthwise_conv2d_taps", lambda *a: direct.append(1) or real(*a))
    torch.manual_seed(0)
    conv = DepthwiseConv(16, 16, 3, padding=1, groups=16).eval()
    small, large = torch.randn(2, 16, 9, 9), torch.randn(1, 16, 240, 240)
    cases = [(cl(small), True), (small, False), (cl(large), False), (cl(small), True)]
    for x, kernel in cases * 2:
        direct.clear()
        with torch.no_grad():
            got = conv(x)
        assert bool(direct) == kernel
        ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1, groups=16)
        assert rel_err(got, ref) < 1e-6
    direct.clear()
    with torch.no_grad(), native.disabled():
        conv(cl(small))
    assert not direct
    x = cl(small).requires_grad_()
    out = conv(x)
    assert not direct and out.grad_fn is not None
    out.sum().backward()
    x2 = cl(small).requires_grad_()
    F.conv2d(x2, conv.weight, conv.bias, padding=1, groups=16).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)


@pytest.mark.parametrize("B,G,H,W,c,cv,smk,k", [(2, 3, 14, 15, 16, 16, 5, 13), (1, 2, 9, 11, 8, 8, 3, 7),
                                                (2, 4, 7, 7, 4, 24, 5, 7)])
def test_context_mix_trains_in_the_fused_kernels(forced, B, G, H, W, c, cv, smk, k):
    """Under autograd on CPU, ContMix's softmax and aggregation run in the hand-written kernels (forward and
    backward); values and every gradient as the official order of operations in float64."""
    from overlock.contmix import context_mix, context_mix_reference
    torch.manual_seed(0)
    proj = torch.nn.Conv2d(49, smk * smk + k * k, 1)
    inputs = [cl(torch.randn(B, G * c, H, W)), torch.randn(B, G * c, 7, 7), cl(torch.randn(B, 2 * G * cv, H, W)),
              torch.randn(G, 2 * smk - 1, 2 * smk - 1) * 0.3, torch.randn(G, 2 * k - 1, 2 * k - 1) * 0.3]
    grad = cl(torch.randn(B, 2 * G * cv, H, W))
    results = []
    for fn, dtype in ((context_mix, torch.float32), (context_mix_reference, torch.float64)):
        p = torch.nn.Conv2d(49, smk * smk + k * k, 1).to(dtype)
        p.load_state_dict(proj.state_dict())
        ts = [t.to(dtype).requires_grad_() for t in inputs]
        out = fn(ts[0], ts[1], ts[2], p, ts[3], ts[4], smk, k, G)
        results.append((out, torch.autograd.grad(out, [*ts, p.weight, p.bias], grad.to(dtype))))
    (out, grads), (ref, ref_grads) = results
    assert type(out.grad_fn).__name__ == "PermuteBackward0"
    assert type(out.grad_fn.next_functions[0][0]).__name__ == "_SoftmaxAVBackward"
    assert rel_err(out, ref) < 1e-6
    for name, got, want in zip(["query", "key", "value", "rpb1", "rpb2", "proj.weight", "proj.bias"], grads,
                               ref_grads):
        assert rel_err(got, want) < 1e-6, name


def test_fused_aggregation_backward_declines_what_it_does_not_cover():
    q, keys, bias = torch.randn(1, 1, 49, 8), torch.randn(1, 1, 8, 25), torch.randn(1, 49, 25)
    v = torch.randn(1, 1, 7, 7, 40)  # 40 channels per head: more than the kernel holds
    assert native.na2d_softmax_av_backward(q, keys, bias, v, v.clone(), torch.empty_like(v), 5) is None
    v8 = v[..., :8].contiguous()
    assert native.na2d_softmax_av_backward(q, keys, bias, v8, v8.clone(), torch.empty_like(v8), 9) is None  # map < k
    got = native.na2d_softmax_av_backward(q, keys, bias, v8, v8.clone(), torch.empty_like(v8), 5)
    assert got is not None and [t.shape for t in got] == [q.shape, keys.shape, bias.shape]


@pytest.mark.parametrize("channels,kernel", [(8, 3), (16, 5), (256, 13), (24, 17), (40, 1)])
def test_kernel_layouts_in_and_out(channels, kernel):
    """The kernel handed to the C loops (taps major, turned 180 degrees for the input gradient) and the weight
    gradient handed back (the parameter's own (C, 1, kh, kw) layout, so autograd keeps it without a copy)."""
    torch.manual_seed(0)
    w = torch.randn(channels, 1, kernel, kernel)
    for flip in (False, True):
        ref = (w.flip(-2, -1) if flip else w).reshape(channels, -1).t().contiguous()
        assert torch.equal(native._taps(w, flip), ref)
        assert torch.equal(native._taps(w.contiguous(memory_format=torch.channels_last), flip), ref)
    x, g = cl(torch.randn(2, channels, 9, 11)), cl(torch.randn(2, channels, 9, 11))
    dw = native.depthwise_weight_grad_same(x, g, (kernel, kernel))
    want = torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], [kernel // 2] * 2, [1, 1], False, [0, 0],
                                               channels, [False, True, False])[1]
    assert dw.shape == w.shape and dw.is_contiguous()
    torch.testing.assert_close(dw, want, rtol=1e-4, atol=1e-4)
    # autograd keeps the native weight gradient as it is
    wp = torch.nn.Parameter(w.clone())
    depthwise.depthwise_conv2d(x, wp, None, (kernel // 2, kernel // 2)).backward(g)
    torch.testing.assert_close(wp.grad, want, rtol=1e-4, atol=1e-4)


def test_grn_backward_kernels_match_float64():
    """GRN's training statistics in one pass, its backward in two: the per-channel sums, then the input gradient and
    the rebuilt output written over the two maps (odd pixel count, 24 channels: a partial 32-channel block)."""
    torch.manual_seed(0)
    g, x = cl(torch.randn(3, 24, 9, 7)), cl(torch.randn(3, 24, 9, 7))
    s, t, beta = torch.randn(3, 24), torch.randn(3, 24), torch.randn(1, 24, 1, 1)
    assert rel_err(native.grn_sum_squares(x), x.double().square().sum((2, 3))) < 1e-6  # the forward's statistics
    ds, gs = native.grn_backward_sums(g, x)
    assert rel_err(ds, (g.double() * x.double()).sum((2, 3))) < 1e-6
    assert rel_err(gs, g.double().sum((2, 3))) < 1e-6
    want_g = g.double() * s.double()[..., None, None] + x.double() * t.double()[..., None, None]
    want_x = x.double() * s.double()[..., None, None] + beta.double()
    g2, x2 = g.clone(), x.clone()
    assert native.grn_backward_apply(g2, x2, s, t, beta)
    assert rel_err(g2, want_g) < 1e-6 and rel_err(x2, want_x) < 1e-6
    g3, x3 = g.clone(), x.clone()
    assert native.grn_backward_apply(g3, x3, s, t) and torch.equal(g3, g2) and torch.equal(x3, x)  # no beta: x kept
    assert native.grn_backward_sums(g.contiguous(), x.contiguous()) is None                      # NCHW
    assert native.grn_backward_sums(cl(torch.randn(1, 12, 3, 3)), cl(torch.randn(1, 12, 3, 3))) is None  # 12 channels
    assert not native.grn_backward_apply(g.double(), x.double(), s, t)


def test_grn_mlp_training_backward_runs_the_grn_kernels(monkeypatch):
    """The GRN-MLP tail's backward (ops/grn_mlp.py) through the two GRN kernels: gradients of the plain graph."""
    from overlock.layers import GrnMlp
    from overlock.ops import recompute
    monkeypatch.setattr(native, "NATIVE_ISAS", {native.cpu_isa()})
    calls = []
    real = native.grn_backward_apply
    monkeypatch.setattr(native, "grn_backward_apply", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    mlp = GrnMlp(8, 32, 8).to(memory_format=torch.channels_last).train()
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0, 0.5)
    x = cl(torch.randn(2, 8, 10, 9))
    g = cl(torch.randn(2, 8, 10, 9))
    grads = {}
    for plain in (True, False):
        monkeypatch.setattr(recompute, "enabled", (lambda *a: False) if plain else (lambda *a: True))
        xi = x.clone().requires_grad_()
        grads[plain] = torch.autograd.grad(mlp(xi), [xi, *mlp.parameters()], g)
    assert calls
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * a.abs().max().item())


def test_silu_mul_matches_float64():
    """The Focus-Net gate's ``SiLU(a) * b`` in one pass: float64's values to float rounding over the whole range
    (large negative and positive inputs, zeros, a length that is not a multiple of 8); declines other layouts."""
    torch.manual_seed(0)
    a = torch.randn(3, 37) * 8
    a[0, :6] = torch.tensor([-100.0, 100.0, 0.0, -0.0, -20.0, 20.0])
    b = torch.randn(3, 37)
    want = F.silu(a.double()) * b.double()
    got = a.clone()
    assert native.silu_mul_(got, b)
    assert ((got - want).abs() <= 1e-6 * want.abs() + 1e-30).all()
    assert not native.silu_mul_(a.clone(), b.t().contiguous().t())  # another layout
    assert not native.silu_mul_(a.double(), b.double())


def test_biases_added_after_the_gemm_give_the_bits_of_the_biased_one():
    """The Focus-Net block's fusion and gate 1x1s leave their biases to the next pass: GRN's scale of ``x + bias``
    (``x + bias`` written over ``x``) and ``SiLU(a + bias) * b`` have the bits of PyTorch's sum then the bias-free
    kernel; other layouts and lengths are declined."""
    g = torch.Generator().manual_seed(0)
    x = cl(torch.randn(2, 40, 5, 7, generator=g) * 3)
    bias, gamma = torch.randn(40, generator=g), torch.randn(40, generator=g)
    summed = x + bias.view(1, -1, 1, 1)
    got = x.clone()
    scale = native.grn_scale(got, gamma, bias)
    assert torch.equal(got, summed) and torch.equal(scale, native.grn_scale(summed, gamma))
    unbiased = x.clone()
    assert torch.equal(native.grn_scale(unbiased, gamma), native.grn_scale(x, gamma)) and torch.equal(unbiased, x)
    assert native.grn_scale(x.clone(), gamma, bias[:-8]) is None

    a, b = cl(torch.randn(2, 40, 5, 7, generator=g) * 8), cl(torch.randn(2, 40, 5, 7, generator=g))
    want = (a + bias.view(1, -1, 1, 1)).contiguous(memory_format=torch.channels_last)
    assert native.silu_mul_(want, b)
    got = a.clone()
    assert native.silu_mul_(got, b, bias) and torch.equal(got, want)
    assert rel_err(got, F.silu(a.double() + bias.double().view(1, -1, 1, 1)) * b.double()) < 1e-6
    assert not native.silu_mul_(a.contiguous(), b.contiguous(), bias)        # NCHW: no channel rows
    assert not native.silu_mul_(a.clone(), b, bias[:-8])                      # wrong bias length
    odd = cl(torch.randn(1, 12, 3, 3, generator=g))
    assert not native.silu_mul_(odd, odd.clone(), torch.randn(12, generator=g))  # 12 channels


@pytest.mark.parametrize("shape,kernel", [((2, 16, 9, 7), (3, 3)), ((1, 24, 5, 6), (3, 1)), ((3, 8, 1, 4), (3, 3))])
def test_conv_input_gradient_through_gelu_matches_float64(shape, kernel):
    """``depthwise_gelu_grad``: the gradient reaching a GELU's input through the small conv after it, one pass."""
    torch.manual_seed(0)
    g, u = cl(torch.randn(shape)), cl(2 * torch.randn(shape))
    w = torch.randn(shape[1], 1, *kernel)
    u64 = u.double().requires_grad_()
    y = F.conv2d(F.gelu(u64), w.double(), padding=(kernel[0] // 2, kernel[1] // 2), groups=shape[1])
    want, = torch.autograd.grad(y, u64, g.double())
    out = cl(torch.full(shape, float("nan")))
    got = native.depthwise_gelu_grad(g, w, u, out=out)
    assert got is out and rel_err(got, want) < 1e-6
    assert native.depthwise_gelu_grad(g, torch.randn(shape[1], 1, 5, 5), u) is None  # 25 taps: not this kernel
    assert native.depthwise_gelu_grad(g, w, u.contiguous()) is None  # layouts must match


@pytest.mark.parametrize("shape,kernel,dilation", [((2, 16, 12, 11), 5, 1), ((1, 24, 14, 14), 3, 4),
                                                    ((3, 8, 7, 9), 9, 2)])
@pytest.mark.parametrize("add", [False, True])
def test_batch_norm_branch_backward_matches_float64(shape, kernel, dilation, add):
    """``bn_branch_backward``: one dilated branch's whole training backward, BatchNorm(conv(x)) with batch
    statistics, the input gradient written or added into the given map."""
    torch.manual_seed(0)
    x, g = cl(torch.randn(shape)), cl(torch.randn(shape))
    C = shape[1]
    w, gamma = torch.randn(C, 1, kernel, kernel), torch.rand(C) + 0.5
    pad = dilation * (kernel // 2)
    x64, w64, gamma64 = (t.double().requires_grad_() for t in (x, w, gamma))
    z = F.conv2d(x64, w64, padding=pad, dilation=dilation, groups=C)
    y = F.batch_norm(z, None, None, gamma64, torch.zeros(C, dtype=torch.float64), training=True, eps=1e-5)
    want_x, want_w, want_gamma = torch.autograd.grad(y, (x64, w64, gamma64), g.double())
    with torch.no_grad():
        z32 = F.conv2d(x, w, padding=pad, dilation=dilation, groups=C)
        _, mean, invstd = torch.native_batch_norm(z32, gamma, None, None, None, True, 0.0, 1e-5)
    start = cl(torch.randn(shape))
    grad_x = start.clone()
    dw, dot = native.bn_branch_backward(x, w, dilation, g, g.sum((0, 2, 3)), mean, invstd, gamma,
                                        cl(torch.empty(shape)), grad_x, add, True)
    assert rel_err(grad_x - (start if add else 0), want_x) < 1e-5
    assert rel_err(dw, want_w) < 1e-5 and rel_err(dot * invstd, want_gamma) < 1e-5


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_statistics_match_float64(affine):
    """``bn_batch_stats``: one read of a map gives BatchNorm's batch mean and inverse std (float32), the normalizing
    ``y * a + b`` coefficients and, in float64, the mean and unbiased variance for the running averages; the same
    bits for one thread or two (fixed summation blocks). A mean far from zero: no float cancellation."""
    torch.manual_seed(0)
    y = cl(torch.randn(3, 24, 7, 9) * 3 + 20)  # 189 pixels: several summation blocks, the last one partial
    gamma, beta = (torch.randn(24), torch.randn(24)) if affine else (None, None)
    out, moments = native.bn_batch_stats(y, gamma, beta, 1e-3)
    y64 = y.double()
    mean, var = y64.mean((0, 2, 3)), y64.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(moments[0], mean, rtol=1e-14, atol=0)
    torch.testing.assert_close(moments[1], y64.var((0, 2, 3)), rtol=1e-10, atol=0)
    invstd = (var + 1e-3).rsqrt()
    torch.testing.assert_close(out[0], mean.float(), rtol=1e-7, atol=0)
    torch.testing.assert_close(out[1], invstd.float(), rtol=1e-6, atol=0)
    a = out[1] * (gamma if affine else 1)
    assert torch.equal(out[2], a)
    torch.testing.assert_close(out[3], (beta if affine else 0) - out[0] * a, rtol=1e-6, atol=1e-6)
    normalized = y * out[2].view(1, -1, 1, 1) + out[3].view(1, -1, 1, 1)
    want = F.batch_norm(y64, None, None, None if gamma is None else gamma.double(),
                        None if beta is None else beta.double(), training=True, eps=1e-3)
    assert rel_err(normalized, want) < 1e-6
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        again = native.bn_batch_stats(y, gamma, beta, 1e-3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(again[0], out) and torch.equal(again[1], moments)
    running_mean, running_var = torch.randn(24), torch.rand(24) + 0.5
    rm, rv = running_mean.clone(), running_var.clone()
    assert native.bn_running_update(rm, rv, moments, 0.1)
    torch.testing.assert_close(rm, (0.9 * running_mean.double() + 0.1 * mean).float(), rtol=1.2e-7, atol=0)
    torch.testing.assert_close(rv, (0.9 * running_var.double() + 0.1 * y64.var((0, 2, 3))).float(), rtol=1.2e-7,
                               atol=0)


def test_batch_norm_statistics_decline():
    """Maps the statistics kernel does not take: ``None``, nothing computed (the caller runs PyTorch's)."""
    assert native.bn_batch_stats(cl(torch.randn(2, 12, 4, 4)), None, None, 1e-5) is None  # 12 channels
    assert native.bn_batch_stats(torch.randn(2, 16, 4, 4), None, None, 1e-5) is None  # not channels_last
    assert native.bn_batch_stats(cl(torch.randn(1, 16, 1, 1)), None, None, 1e-5) is None  # one value per channel
    assert native.bn_batch_stats(cl(torch.randn(2, 16, 4, 4)), torch.randn(8), None, 1e-5) is None
    assert native.bn_batch_stats(cl(torch.randn(2, 16, 4, 4).double()), None, None, 1e-5) is None


@pytest.mark.parametrize("accumulate", [False, True])
def test_channel_affine_accumulates_a_normalized_map(accumulate):
    """``channel_affine_acc_``: ``acc (+)= y * a + b`` per channel in one pass; declined layouts write nothing."""
    torch.manual_seed(0)
    y, start = cl(torch.randn(2, 40, 9, 11)), cl(torch.randn(2, 40, 9, 11))
    a, b = torch.randn(40), torch.randn(40)
    acc = start.clone()
    assert native.channel_affine_acc_(acc, y, a, b, accumulate)
    want = y.double() * a.double().view(1, -1, 1, 1) + b.double().view(1, -1, 1, 1) + (start.double() if accumulate
                                                                                        else 0)
    torch.testing.assert_close(acc, want.float(), rtol=1e-6, atol=1e-6)
    for bad_acc, bad_y, bad_a in ((start.contiguous(), y, a), (start.clone(), y[:, :, :8], a),
                                  (start.clone(), y, a[:32])):
        before = bad_acc.clone()
        assert not native.channel_affine_acc_(bad_acc, bad_y, bad_a, b, accumulate)
        assert torch.equal(bad_acc, before)


@pytest.mark.parametrize("rows,cols,ld", [(196, 768, 768), (37, 40, 40), (9, 27, 33), (70000 // 64, 64, 80)])
def test_bias_gelu_gives_the_bits_of_gelu_of_the_sum(rows, cols, ld):
    """A GEMM output and its bias: one in-place pass, the bits of ``gelu(x + bias)`` (rows ``ld`` floats apart, the
    padding between them untouched; a 27-wide row ends in a partial vector; 256-bit code alike)."""
    g = torch.Generator().manual_seed(rows)
    base = torch.randn(rows, ld, generator=g) * 4  # values below -3 too: GELU's other formula
    bias = torch.randn(cols, generator=g)
    # GELU's cheap formula is chosen per group of 8 values: per row here, so the reference runs row by row
    want = torch.stack([native.gelu(row + bias) for row in base[:, :cols]])
    assert rel_err(want, F.gelu((base[:, :cols] + bias).double())) < 1e-6
    for narrow in (False, True):
        x = base.clone()
        if narrow:
            with native.narrow_vectors():
                assert native.bias_gelu_(x[:, :cols], bias)
        else:
            assert native.bias_gelu_(x[:, :cols], bias)
        assert torch.equal(x[:, :cols], want) and torch.equal(x[:, cols:], base[:, cols:])
    assert not native.bias_gelu_(base[:, :cols].t(), bias[:1].expand(rows))  # columns not dense: declined
    assert not native.bias_gelu_(base[:, :cols], bias[:-1])                    # wrong bias length


def test_fused_mlp_first_1x1_leaves_its_bias_to_gelu(monkeypatch):
    """The fused GRN-MLP's first 1x1 runs as a GEMM without bias and ``native.bias_gelu_`` adds it (skipping
    addmm's copy of the bias into the output): the bits of the bias-free GEMM plus the bias then GELU, the biased
    GEMM's to float rounding, with and without SE's per-sample scale (batch 1 and 3)."""
    from overlock.fused import pointwise_scaled
    calls = []
    real = native.bias_gelu_
    monkeypatch.setattr(native, "bias_gelu_", lambda x, b: calls.append(x.shape) or real(x, b))
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 32, generator=g) * 0.2, torch.randn(96, generator=g)
    for B in (1, 3):
        x = cl(torch.randn(B, 32, 6, 5, generator=g))
        s = torch.rand(B, 32, 1, 1, generator=g)
        with torch.no_grad():
            for scale in (None, s):
                got = pointwise_scaled(w, b, x, scale=scale, gelu="none")
                xs = (x * (1 if scale is None else scale)).permute(0, 2, 3, 1).reshape(-1, 32)
                want = native.gelu(torch.addmm(b, xs, w.t())).view(B, 6, 5, 96).permute(0, 3, 1, 2)
                assert rel_err(got, want) < 1e-6
                if scale is None:  # the GEMM without bias, then the bias and GELU: exactly those bits
                    exact = native.gelu(torch.mm(xs, w.t()) + b).view(B, 6, 5, 96).permute(0, 3, 1, 2)
                    assert torch.equal(got, exact)
    assert len(calls) == 4
    xg = cl(torch.randn(1, 32, 6, 5, generator=g)).requires_grad_()
    pointwise_scaled(w, b, xg, gelu="none").sum().backward()  # autograd: the plain biased GEMM, no kernel call
    assert len(calls) == 4 and xg.grad is not None


@pytest.mark.parametrize("B,Cx,Cc,H,W", [(1, 256, 128, 14, 14), (3, 16, 8, 5, 7)])
def test_context_concat_gives_the_bits_of_addcmul_twice_then_cat(B, Cx, Cc, H, W):
    """The Focus-Net block's input ``[x, b + ctx * w1 + prior * w2]`` in one pass, ``x`` and ``ctx`` two channel
    slices of the previous block's output as in the model."""
    torch.manual_seed(0)
    x, ctx = cl(torch.randn(B, Cx + Cc, H, W)).split([Cx, Cc], dim=1)
    prior = cl(torch.randn(B, Cc, H, W))
    w1, w2, b = (torch.randn(1, Cc, 1, 1) for _ in range(3))
    got = native.context_concat(x, ctx, prior, w1, w2, b)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, torch.cat([x, torch.addcmul(b, ctx, w1).addcmul_(prior, w2)], dim=1))
    assert native.context_concat(x, ctx, prior[..., 1:], w1, w2, b) is None  # mismatched sizes: declined


@pytest.mark.parametrize("shape,kernel", [((1, 24, 14, 13), 3), ((3, 16, 5, 7), 3), ((2, 8, 1, 9), 3),
                                          ((2, 8, 2, 3), 3), ((1, 16, 6, 6), 1)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_conv_then_grn_written_over_its_input_gives_the_same_bits(shape, kernel, threads):
    """The GRN-MLP's conv + GRN written over its input (bands of rows per thread, the rows just outside each band
    saved first, every output row written back one row later): the bits of the call into a new buffer, for bands
    that start and end inside an image or between images, and for any thread count."""
    torch.manual_seed(0)
    C = shape[1]
    x = cl(torch.randn(shape))
    taps, b, gamma = torch.randn(kernel * kernel, C), torch.randn(C), torch.rand(C)
    was = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for apply in (False, True):
            want = native.depthwise_conv2d_taps_grn(x, taps, b, kernel, kernel, gamma, apply)
            own = x.clone(memory_format=torch.channels_last)
            got = native.depthwise_conv2d_taps_grn(own, taps, b, kernel, kernel, gamma, apply, inplace=True)
            assert got[0].data_ptr() == own.data_ptr()
            assert torch.equal(got[0], want[0]) and (apply or torch.equal(got[1], want[1]))
    finally:
        torch.set_num_threads(was)


def test_fused_model_with_every_inference_kernel_matches_the_exact_one(forced, tiny_config, monkeypatch):
    """The fused tiny model at 112 px, where each kernel of the fused inference path runs (the GRN-MLP's conv
    written over its input on the 28x28 map, ContMix's two windows in one call with the biases from the tables, the
    Focus-Net block's input in one pass, the residual identities prepared in the conv-then-norm calls, the 1x1s'
    biases added by the GELU, GRN and SiLU passes after them): the exact model's outputs to float rounding, and the
    caller's input left as it was. The blocks' straight-line forwards (``fused_native``, which call the kernels
    directly) are switched off for the count, and give the same bits."""
    from timm.utils import reparameterize_model

    from overlock import fused_native
    seen = {"inplace": 0, "pair_tables": 0, "concat": 0, "identity": 0, "bias_gelu": 0, "bias_grn": 0,
            "bias_silu": 0}

    def spy(name, count, real):
        def call(*a, **k):
            out = real(*a, **k)
            if out is not None and out is not False and count(a, k):
                seen[name] += 1
            return out
        monkeypatch.setattr(native, real.__name__, call)

    spy("inplace", lambda a, k: k.get("inplace", a[7] if len(a) > 7 else False), native.depthwise_conv2d_taps_grn)
    spy("pair_tables", lambda a, k: k.get("proj_bias") is not None, native.na2d_softmax_av_pair)
    spy("concat", lambda a, k: True, native.context_concat)
    spy("identity", lambda a, k: any(t is not None for t in a[8:10]), native.depthwise_conv2d_taps_norm)
    spy("bias_gelu", lambda a, k: True, native.bias_gelu_)
    spy("bias_grn", lambda a, k: len(a) > 2 and a[2] is not None, native.grn_scale)
    spy("bias_silu", lambda a, k: len(a) > 2 and a[2] is not None, native.silu_mul_)
    model = OverLoCK(**tiny_config).eval()
    load_into(model, DATA / "classification.pth")
    fused = reparameterize_model(model, inplace=False).to(memory_format=torch.channels_last)
    torch.manual_seed(0)
    x = cl(torch.randn(2, 3, 112, 112))
    before = x.clone()
    with torch.inference_mode():
        lean = fused(x)
        assert seen["inplace"] == 0  # the RepConv blocks' straight-line forward called the kernel itself
        monkeypatch.setattr(fused_native, "repconv_block", lambda *a: None)
        monkeypatch.setattr(fused_native, "focus_block", lambda *a: None)
        want, got = model(x), fused(x)
    assert torch.equal(x, before)
    assert rel_err(got, want) < 1e-5 and torch.equal(lean, got)
    assert all(seen.values()), seen
