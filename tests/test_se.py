"""Squeeze-and-excitation's training path (overlock/ops/se.py) against autograd's graph of the same module."""
import copy

import pytest
import torch

from overlock.layers import SEModule
from overlock.ops import se as se_ops

from conftest import rel_err

CL, NCHW = torch.channels_last, torch.contiguous_format


@pytest.mark.parametrize("shape,memory_format", [((4, 32, 9, 7), CL), ((2, 12, 5, 7), CL), ((3, 16, 6, 6), NCHW)])
def test_se_training_path_matches_autograd(shape, memory_format, monkeypatch):
    """The same output bits; input and parameter gradients to float rounding (the native sums on 8-channel
    channels_last maps, the chunked reduction elsewhere)."""
    torch.manual_seed(0)
    se = SEModule(shape[1])
    with torch.no_grad():
        for p in se.parameters():
            p.normal_()
    ref = copy.deepcopy(se)
    x = torch.randn(shape).contiguous(memory_format=memory_format)
    g = torch.randn_like(x)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = se(xa)
    assert type(out.grad_fn).__name__ == "_SqueezeExciteBackward"
    monkeypatch.setattr(se_ops, "applies", lambda t: False)
    want = ref(xb)
    assert type(want.grad_fn).__name__ == "MulBackward0"
    assert torch.equal(out, want)
    out.backward(g)
    want.backward(g)
    assert rel_err(xa.grad, xb.grad) < 1e-5
    for (name, p), q in zip(se.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) < 1e-5, name


def test_se_training_path_runs_only_under_autograd_and_skips_unneeded_gradients():
    se = SEModule(16)
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        assert se(x).grad_fn is None
    out = se(x)  # a frozen input, trainable gate: only the parameters get gradients
    assert type(out.grad_fn).__name__ == "_SqueezeExciteBackward"
    out.sum().backward()
    assert x.grad is None and all(p.grad is not None for p in se.parameters())
