"""The depthwise conv with the fast CPU weight gradient equals ``F.conv2d`` in value and in every gradient."""
import pytest
import torch
import torch.nn.functional as F

from overlock.layers import DilatedReparamBlock, depthwise_conv
from overlock.ops.depthwise import depthwise_conv2d, depthwise_weight_grad


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("shape,kernel,dilation,channels_last", [
    ((2, 6, 14, 14), 13, 1, True),
    ((3, 4, 9, 11), 5, 2, False),   # non-square map, dilated
    ((2, 5, 20, 17), 7, 3, True),
    ((1, 3, 6, 6), 17, 1, True),    # kernel larger than the map (cropped by depthwise_conv)
    ((2, 4, 8, 8), 3, 1, False),    # 3x3: native path
])
def test_values_and_gradients_match_conv2d(shape, kernel, dilation, channels_last):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(*shape).contiguous(memory_format=fmt).requires_grad_()
    w = torch.randn(shape[1], 1, kernel, kernel, requires_grad=True)
    b = torch.randn(shape[1], requires_grad=True)
    g = torch.randn(shape)
    out = depthwise_conv(x, w, b, dilation=dilation)
    grads = torch.autograd.grad(out, (x, w, b), g)
    x2, w2, b2 = (t.detach().double().requires_grad_() for t in (x, w, b))
    pad = dilation * (kernel // 2)
    ref = F.conv2d(x2, w2, b2, padding=pad, dilation=dilation, groups=shape[1])
    ref_grads = torch.autograd.grad(ref, (x2, w2, b2), g.double())
    assert out.shape == ref.shape and rel_err(out.double(), ref) < 1e-6
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape and rel_err(got.double(), want) < 1e-5


def test_fast_weight_gradient_is_the_one_used_in_cpu_training():
    x = torch.randn(2, 4, 12, 12).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 1, 7, 7, requires_grad=True)
    assert type(depthwise_conv2d(x, w, padding=(3, 3)).grad_fn).__name__ == "_DepthwiseConvBackward"
    with torch.no_grad():
        assert depthwise_conv2d(x, w, padding=(3, 3)).grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast keeps the native conv (and its dtype rules)
        assert type(depthwise_conv2d(x, w, padding=(3, 3)).grad_fn).__name__ != "_DepthwiseConvBackward"


def test_weight_gradient_formula_on_a_hand_sized_case():
    # one sample, one channel, 3x3 map, 3x3 kernel, padding 1: dW[i, j] = sum over the map of xpad(shifted) * dY
    x = torch.arange(9.).view(1, 1, 3, 3)
    dy = torch.ones(1, 1, 3, 3)
    dw = depthwise_weight_grad(x, dy, (3, 3), (1, 1))
    # the centre tap sees every pixel (sum 36); a corner tap sees the 2x2 block opposite to it
    assert dw[0, 0, 1, 1] == 36 and dw[0, 0, 0, 0] == 0 + 1 + 3 + 4 and dw[0, 0, 2, 2] == 4 + 5 + 7 + 8


def test_dilated_reparam_block_trains_the_same_as_with_native_convs(monkeypatch):
    torch.manual_seed(0)
    block = DilatedReparamBlock(8, 13).train()
    x = torch.randn(4, 8, 16, 16).contiguous(memory_format=torch.channels_last)
    block(x).square().sum().backward()
    fast = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad()
    monkeypatch.setattr("overlock.ops.depthwise.MIN_TAPS", 10 ** 6)  # every conv native
    block(x).square().sum().backward()
    for n, p in block.named_parameters():
        assert rel_err(fast[n], p.grad) < 1e-5, n


@pytest.mark.parametrize("shape,kernel,dilation", [
    ((2, 6, 14, 14), 3, 5),    # d does not divide the map: zero-padded sub-maps, native forward
    ((2, 4, 15, 11), 3, 7),    # wide reach: forward on the sub-maps too; non-square map
    ((3, 5, 16, 16), 9, 2),    # 9x9 dilation 2 (wide reach, >= 5 taps: depthwise-form weight gradient)
    ((2, 3, 9, 10), 7, 2),     # 7x7 dilation 2, native forward, fast weight gradient on sub-maps
    ((2, 4, 7, 7), 3, 3),      # stage-4 sized map
    ((1, 3, 5, 6), 5, 3),      # kernel cropped (reach larger than the map)
])
@pytest.mark.parametrize("with_bias", [False, True])
def test_dilated_conv_on_sub_maps_matches_float64_autograd(shape, kernel, dilation, with_bias):
    torch.manual_seed(0)
    x = torch.randn(*shape).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(shape[1], 1, kernel, kernel, requires_grad=True)
    b = torch.randn(shape[1], requires_grad=True) if with_bias else None
    g = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    out = depthwise_conv(x, w, b, dilation=dilation)
    assert out.is_contiguous(memory_format=torch.channels_last)
    inputs = (x, w) + ((b,) if with_bias else ())
    grads = torch.autograd.grad(out, inputs, g)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    k = kernel
    reach_h = min(k // 2, (shape[2] - 1) // dilation)
    reach_w = min(k // 2, (shape[3] - 1) // dilation)
    ref = F.conv2d(ref_in[0], ref_in[1], ref_in[2] if with_bias else None, padding=(k // 2) * dilation,
                   dilation=dilation, groups=shape[1])
    ref_grads = torch.autograd.grad(ref, ref_in, g.double())
    assert out.shape == ref.shape and rel_err(out.double(), ref) < 1e-6
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape and rel_err(got.double(), want) < 1e-6
    with torch.no_grad():  # the no-autograd path (native or sub-map forward) gives the same values
        assert rel_err(depthwise_conv(x, w, b, dilation=dilation).double(), ref) < 1e-6
    assert reach_h >= 0 and reach_w >= 0


@pytest.mark.parametrize("size,d", [((7, 7), 2), ((14, 14), 5), ((9, 12), 4), ((8, 8), 2), ((3, 2), 3)])
def test_grid_split_and_merge_are_inverse(size, d, monkeypatch):
    from overlock.ops.depthwise import grid_merge, grid_split
    x = torch.randn(2, 3, *size).contiguous(memory_format=torch.channels_last)
    # fresh buffers full of NaN: every sub-map pixel must be written (copied or zeroed), none left as found
    real = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty",
                        lambda self, *shape, **kw: real(self, *shape, **kw).fill_(float("nan")))
    xs = grid_split(x, d)
    h, w = -(-size[0] // d), -(-size[1] // d)
    assert xs.shape == (2 * d * d, 3, h, w)
    # sub-map (r, s) of sample b holds x[b, :, r::d, s::d], zero past the border
    sub = xs.view(2, d, d, 3, h, w)
    for r in range(d):
        for s in range(d):
            part = x[:, :, r::d, s::d]
            assert torch.equal(sub[:, r, s, :, :part.shape[2], :part.shape[3]], part)
            assert sub[:, r, s, :, part.shape[2]:].abs().sum() == 0 and sub[:, r, s, :, :, part.shape[3]:].abs().sum() == 0
    assert torch.equal(grid_merge(xs, d, *size), x)


def test_dilated_reparam_block_grads_equal_native_with_sub_map_path(monkeypatch):
    torch.manual_seed(0)
    for ks, size in ((17, 20), (13, 14), (7, 7)):
        block = DilatedReparamBlock(6, ks).train()
        x = torch.randn(3, 6, size, size).contiguous(memory_format=torch.channels_last).requires_grad_()
        block(x).square().sum().backward()
        fast = {n: p.grad.clone() for n, p in block.named_parameters()}
        gx = x.grad.clone()
        block.zero_grad()
        x.grad = None
        monkeypatch.setattr("overlock.ops.depthwise._use_grid", lambda *a: False)
        monkeypatch.setattr("overlock.ops.depthwise.MIN_TAPS", 10 ** 6)
        block(x).square().sum().backward()
        monkeypatch.undo()
        assert rel_err(gx, x.grad) < 1e-5
        for n, p in block.named_parameters():
            assert rel_err(fast[n], p.grad) < 1e-5, n



@pytest.mark.parametrize("grad", [False, True])
def test_widened_kernel_gives_the_same_values_and_gradients(monkeypatch, grad):
    """A 13x13 kernel run zero-padded to 15x15 (the AVX-512 rule, forced here on any CPU) changes nothing."""
    import overlock.ops.depthwise as dw
    calls = []
    real_conv2d = F.conv2d

    def spy(x, w, *args, **kwargs):
        calls.append(tuple(w.shape[-2:]))
        return real_conv2d(x, w, *args, **kwargs)

    monkeypatch.setattr(dw, "_cpu_isa", lambda: "TEST")
    monkeypatch.setattr(dw.native, "NATIVE_ISAS", set())  # a CPU where oneDNN's kernels run
    monkeypatch.setattr(dw, "WIDENED_KERNELS", {"TEST": {13: 15}})
    monkeypatch.setattr(dw.F, "conv2d", spy)
    torch.manual_seed(0)
    x = torch.randn(2, 8, 14, 14).contiguous(memory_format=torch.channels_last).requires_grad_(grad)
    w = torch.randn(8, 1, 13, 13, requires_grad=grad)
    b = torch.randn(8, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        out = depthwise_conv(x, w, b)
    assert calls[0] == (15, 15), "the 13x13 forward did not run as 15x15"
    x2, w2, b2 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = real_conv2d(x2, w2, b2, padding=6, groups=8)
    assert rel_err(out.double(), ref) < 1e-6
    assert out.is_contiguous(memory_format=torch.channels_last)
    if grad:
        g = torch.randn_like(out)
        for got, want in zip(torch.autograd.grad(out, (x, w, b), g), torch.autograd.grad(ref, (x2, w2, b2), g.double())):
            assert got.shape == want.shape and rel_err(got.double(), want) < 1e-5
    calls.clear()
    depthwise_conv(x.detach().contiguous(), w.detach(), b.detach())  # NCHW: not measured, left native
    assert calls == [(13, 13)]


@pytest.mark.parametrize("isa,dilation,on_sub_maps", [("AVX2", 5, True), ("AVX512", 5, False), ("AVX512", 7, True),
                                                      ("AVX2", 4, False)])
def test_dilated_forward_on_sub_maps_past_the_isa_reach(monkeypatch, isa, dilation, on_sub_maps):
    """The reach from which the forward runs on sub-maps is per ISA (oneDNN leaves its depthwise kernel earlier on
    AVX2); either way the values are those of the dilated conv."""
    import overlock.ops.depthwise as dw
    splits = []
    real_split = dw.grid_split

    def spy(x, d):
        splits.append(d)
        return real_split(x, d)

    monkeypatch.setattr(dw, "_cpu_isa", lambda: isa)
    monkeypatch.setattr(dw.native, "NATIVE_ISAS", set())  # oneDNN's dilated kernels are what this rule is about
    monkeypatch.setattr(dw, "grid_split", spy)
    torch.manual_seed(0)
    x = torch.randn(2, 8, 20, 20).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(8, 1, 3, 3), torch.randn(8)
    with torch.no_grad():
        out = depthwise_conv(x, w, b, dilation=dilation)
    assert bool(splits) == on_sub_maps
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=dilation, dilation=dilation, groups=8)
    assert rel_err(out.double(), ref) < 1e-6


@pytest.mark.parametrize("kernel,dilation", [(3, 1), (13, 1), (3, 5)])
def test_compiles_without_graph_breaks(kernel, dilation):
    """torch.compile traces the kernel choice as constants (asking the CPU's ISA inside a trace breaks it)."""
    torch._dynamo.reset()
    w = torch.randn(16, 1, kernel, kernel, requires_grad=True)
    fn = torch.compile(lambda x: depthwise_conv(x, w, dilation=dilation), fullgraph=True, backend="eager")
    x = torch.randn(2, 16, 20, 20).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = fn(x)
    ref = F.conv2d(x.double(), w.double(), padding=dilation * (kernel // 2), dilation=dilation, groups=16)
    assert rel_err(out.double(), ref) < 1e-6
