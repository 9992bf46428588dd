"""The trainers' and benchmarks' Adam/AdamW use PyTorch's fused kernel where it exists, with the loop's update."""
import copy

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2

import overlock  # noqa: F401  (registers the models)
from overlock.training.optim import fused_kwargs


def _cpu_fused() -> bool:
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    return "cpu" in _get_fused_kernels_supported_devices()


def test_fused_only_for_adam_family_and_float_parameters():
    params = [torch.zeros(3, requires_grad=True)]
    expect = {"fused": True} if _cpu_fused() else {}
    assert fused_kwargs(params) == expect
    assert fused_kwargs(params, "AdamW") == expect
    assert fused_kwargs(params, "adam") == expect
    assert fused_kwargs(params, "sgd") == {}
    assert fused_kwargs(params, "lamb") == {}  # timm's own optimizers have no fused kernel
    assert fused_kwargs([torch.zeros(3, dtype=torch.int64)]) == {}
    assert fused_kwargs([]) == {}


@pytest.mark.skipif(not _cpu_fused(), reason="this torch has no fused CPU AdamW (torch < 2.4)")
def test_fused_adamw_follows_the_loop_on_the_model():
    """timm's parameter groups (no decay on norms and biases), one step from the same gradients: the same weights
    to float rounding (later steps amplify rounding: Adam scales tiny gradients, such as those of a bias before a
    training-mode BatchNorm, to full steps)."""
    torch.manual_seed(0)
    model = timm.create_model("test_overlock", use_ds=True, num_classes=5).train()
    twin, start = copy.deepcopy(model), copy.deepcopy(model)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])
    opts = [create_optimizer_v2(m, opt="adamw", lr=1e-2, weight_decay=0.05, **kw)
            for m, kw in ((model, {}), (twin, fused_kwargs(twin.parameters())))]
    assert opts[1].defaults["fused"] and not opts[0].defaults["fused"]
    for m, opt in zip((model, twin), opts):
        logits, aux = m(x, return_aux=True)
        loss = torch.nn.functional.cross_entropy(logits, y) + 0.4 * torch.nn.functional.cross_entropy(aux, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)
    moved = sum(not torch.allclose(a, a0) for a, a0 in zip(model.parameters(), start.parameters()))
    assert moved > 0.9 * len(list(model.parameters()))  # the step did move (almost) every tensor
