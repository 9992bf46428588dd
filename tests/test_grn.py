"""GRN's fused backward (overlock/ops/grn.py) equals float64 autograd of the plain formula."""
import pytest
import torch


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("shape,channels_last", [((3, 8, 9, 7), True), ((2, 5, 6, 6), False), ((1, 4, 5, 5), True),
                                                 ((70, 4, 4, 4), True)])
def test_grn_fused_backward_matches_float64_autograd(shape, channels_last):
    from overlock.layers import GRN
    torch.manual_seed(0)
    grn = GRN(shape[1])
    with torch.no_grad():
        grn.gamma.normal_()
        grn.beta.normal_()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(*shape).contiguous(memory_format=fmt)
    x[0, 1] = 0  # an all-zero channel map: gradient 0 through the norm, as vector_norm's
    x.requires_grad_()
    g = torch.randn(shape).contiguous(memory_format=fmt)
    out = grn(x)
    assert type(out.grad_fn).__name__ == "_GrnBackward"
    grads = torch.autograd.grad(out, (x, grn.gamma, grn.beta), g)
    xd, gd, bd = (t.detach().double().requires_grad_() for t in (x, grn.gamma, grn.beta))
    gx = torch.linalg.vector_norm(xd, dim=(-1, -2), keepdim=True)
    ref = torch.addcmul(bd, xd, gd * (gx / (gx.mean(dim=1, keepdim=True) + 1e-6)) + 1)
    ref_grads = torch.autograd.grad(ref, (xd, gd, bd), g.double())
    assert rel_err(out.double(), ref) < 1e-6
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all() and rel_err(got.double(), want) < 1e-6
    with torch.no_grad():
        assert rel_err(grn(x).double(), ref) < 1e-6


def test_half_precision_maps_keep_the_plain_graph():
    from overlock.layers import GRN
    grn = GRN(4)
    x = torch.randn(2, 4, 5, 5, dtype=torch.bfloat16, requires_grad=True)
    assert type(grn.to(torch.bfloat16)(x).grad_fn).__name__ != "_GrnBackward"


@pytest.mark.parametrize("grad_layout", [torch.channels_last, torch.contiguous_format])
def test_layer_scale_backward_in_one_read_matches_float64(grad_layout):
    """LayerScale in CPU training (overlock/ops/channel_affine.py): the parameter gradients from one read of the
    output gradient and the input (native per-channel sums; a gradient in another layout takes PyTorch's sums), the
    very forward of ``addcmul``, float64's gradients to float rounding."""
    from overlock.layers import LayerScale
    from overlock.ops import native
    torch.manual_seed(0)
    ls = LayerScale(16, init_value=0.5)
    with torch.no_grad():
        ls.weight.normal_()
        ls.bias.normal_()
    x = torch.randn(3, 16, 9, 7).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(3, 16, 9, 7).contiguous(memory_format=grad_layout)
    out = ls(x)
    want = torch.addcmul(ls.bias.view(1, -1, 1, 1), x, ls.weight.view(1, -1, 1, 1))
    assert torch.equal(out, want)
    if native.used_here():
        assert type(out.grad_fn).__name__ == "_ChannelAffineBackward"
    grads = torch.autograd.grad(out, (x, ls.weight, ls.bias), g)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, ls.weight, ls.bias))
    ref = torch.autograd.grad(xd * wd.view(1, -1, 1, 1) + bd.view(1, -1, 1, 1), (xd, wd, bd), g.double())
    for a, b in zip(grads, ref):
        assert a.shape == b.shape and rel_err(a, b) < 1e-6
    with torch.no_grad():  # inference: the plain op, no custom function
        assert ls(x).grad_fn is None
