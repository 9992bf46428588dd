"""Blocks that rebuild cheap activations in backward give the values and gradients of the plain graph."""
import copy

import pytest
import torch

from overlock.layers import DilatedReparamBlock, GrnMlp
from overlock.models.blocks import DynamicConvBlock, RepConvBlock
from overlock.ops import recompute


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _randomize(module):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
    return module


def _noted(result, log):
    log.append(result is not None)
    return result


def _run(module, inputs, grads, plain, monkeypatch):
    """Outputs and gradients (inputs, then parameters) with recomputation on or off."""
    with monkeypatch.context() as m:
        if plain:
            m.setattr(recompute, "enabled", lambda *a: False)
        xs = [t.detach().clone().requires_grad_() for t in inputs]
        out = module(*xs)
        out = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(out, grads) if o is not None]
        params = list(module.parameters())
        got = torch.autograd.grad([o for o, _ in pairs], xs + params, [g for _, g in pairs], allow_unused=True)
    return [o.detach() for o, _ in pairs], got


def _compare(module, inputs, monkeypatch):
    """Recomputation on and off give the same outputs (bit for bit, except where the dilated branches' scratch
    forward ran: BatchNorm's statistics summed in another order) and gradients (to float rounding)."""
    module.train()
    with torch.no_grad():
        outs = module(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = [torch.randn_like(o) if o is not None else None for o in outs]
    state = {k: v.clone() for k, v in module.state_dict().items()}
    out_a, grad_a = _run(module, inputs, grads, True, monkeypatch)
    module.load_state_dict(state)  # the same BatchNorm statistics for both runs
    scratch = []
    real = recompute._scratch_forward
    monkeypatch.setattr(recompute, "_scratch_forward", lambda *a: _noted(real(*a), scratch))
    out_b, grad_b = _run(module, inputs, grads, False, monkeypatch)
    monkeypatch.setattr(recompute, "_scratch_forward", real)
    for a, b in zip(out_a, out_b):
        if any(scratch):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * a.abs().max().item())
        else:
            assert torch.equal(a, b)
    assert sum(g is not None for g in grad_a) > len(inputs)
    # some gradients are zero in exact arithmetic (a bias in front of a training-mode BatchNorm) and float noise
    # in both runs: compare each tensor relative to its own size, with an absolute floor set by the largest one
    scale = max(g.abs().max().item() for g in grad_a if g is not None)
    for a, b in zip(grad_a, grad_b):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("shape,channels_last", [((2, 6, 9, 7), True), ((3, 4, 5, 11), False), ((1, 8, 6, 6), True)])
def test_grn_mlp_recomputes_exactly(shape, channels_last, monkeypatch):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    mlp = _randomize(GrnMlp(shape[1], 3 * shape[1], 5)).to(memory_format=fmt)
    x = torch.randn(shape).contiguous(memory_format=fmt)
    _compare(mlp, [x], monkeypatch)


def _saved_maps(module, x, numel):
    """Storages of the tensors that ``module(x)`` keeps for backward, of at least ``numel`` elements."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        module(x)
    return {t.untyped_storage().data_ptr() for t in saved if t.numel() >= numel}


def test_grn_mlp_keeps_only_the_hidden_map():
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    big = _saved_maps(GrnMlp(4, 16).train(), x, 2 * 16 * 8 * 8)
    assert len(big) == 1  # the hidden map (fc1's output) only; without recomputation four maps of that size


def test_grn_mlp_scratch_maps_are_kept_across_calls_and_steps(monkeypatch):
    """Two GRN-MLPs of one width in a row: GELU's and the conv's outputs go into two scratch maps in forward, which
    the second block takes again; backward takes those two and a third (three per shape, none shared within a
    call); outputs and gradients are the plain graph's. The maps outlive the step (no fresh, page-faulting buffers
    next step); a step with another batch size lets the old ones go when its backward pass ends; a hook on the conv
    sees its call (the general path); ``release_workspace`` lets everything go."""
    from overlock.ops import grn_mlp, native
    if not native.available():
        pytest.skip(f"native kernels {native.status()}")
    monkeypatch.setattr(native, "NATIVE_ISAS", {native.cpu_isa()})
    grn_mlp.release_workspace()
    cl = dict(memory_format=torch.channels_last)
    mlps = torch.nn.Sequential(_randomize(GrnMlp(8, 32)), _randomize(GrnMlp(8, 32))).to(**cl).train()
    with torch.no_grad():
        for p in mlps[1].parameters():
            p.mul_(torch.rand_like(p) + 0.5)
    x = torch.randn(2, 8, 9, 7).contiguous(**cl)
    g = torch.randn(2, 8, 9, 7)
    handed = []
    real = grn_mlp._workspace
    monkeypatch.setattr(grn_mlp, "_workspace", lambda *a: (lambda t: handed.append((a[1], t.data_ptr())) or t)(
        real(*a)))
    xa = x.clone().requires_grad_()
    out_a = mlps(xa)
    assert [slot for slot, _ in handed] == [1, 2, 1, 2] and handed[:2] == handed[2:] and handed[0][1] != handed[1][1]
    got = torch.autograd.grad(out_a, [xa, *mlps.parameters()], g)
    backward = dict(handed[4:7])
    assert [slot for slot, _ in handed[4:]] == [0, 1, 2] * 2 and handed[4:7] == handed[7:]
    assert backward[1] == handed[0][1] and backward[2] == handed[1][1] and backward[0] not in (handed[0][1],
                                                                                               handed[1][1])
    assert {k[3] for k in grn_mlp._pool.maps} == {0, 1, 2}  # kept for the next step
    xb = x.clone().requires_grad_()
    with monkeypatch.context() as m:
        m.setattr(recompute, "enabled", lambda *a: False)
        out_b = mlps(xb)
        want = torch.autograd.grad(out_b, [xb, *mlps.parameters()], g)
    assert torch.equal(out_a, out_b)
    scale = max(w.abs().max().item() for w in want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)
    handed.clear()
    torch.autograd.grad(mlps(xa).sum(), xa)  # the next step: the same maps, no new ones
    assert {p for _, p in handed} == {p for _, p in backward.items()} and len(grn_mlp._pool.maps) == 3
    x3 = torch.randn(3, 8, 9, 7).contiguous(**cl).requires_grad_()
    torch.autograd.grad(mlps(x3).sum(), x3)  # another batch size: the old maps are let go as its pass ends
    assert {k[0][0] for k in grn_mlp._pool.maps} == {3} and len(grn_mlp._pool.maps) == 3
    # both hidden maps made before either tail runs: backward runs the second tail, then the first before the
    # second one's input gradient has reached fc1; that gradient must not live in a scratch map
    h = [mlp[0](xa) for mlp in mlps]
    got = torch.autograd.grad(sum(grn_mlp.grn_mlp_tail(*list(mlp)[1:], hi) for mlp, hi in zip(mlps, h)), xa, g)[0]
    with monkeypatch.context() as m:
        m.setattr(recompute, "enabled", lambda *a: False)
        want = torch.autograd.grad(sum(mlp[4](mlp[3](mlp[2](mlp[1](mlp[0](xb))))) for mlp in mlps), xb, g)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    calls = []
    mlps[0][2].register_forward_hook(lambda *a: calls.append(1))
    handed.clear()
    mlps(xa)
    assert calls == [1] and [slot for slot, _ in handed] == [1, 2]  # the hooked block took the general path
    grn_mlp.release_workspace()
    assert not grn_mlp._maps()


@pytest.mark.parametrize("channels_last", [True, False])
def test_rep_conv_block_recomputes_exactly(channels_last, monkeypatch):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    block = _randomize(RepConvBlock(8, kernel_size=7, ls_init_value=1.0)).to(memory_format=fmt)
    _compare(block, [torch.randn(2, 8, 9, 10).contiguous(memory_format=fmt)], monkeypatch)


def test_dynamic_conv_block_recomputes_exactly(monkeypatch):
    block = _randomize(DynamicConvBlock(8, 16, kernel_size=5, smk_size=3, num_heads=1, ls_init_value=1.0))
    block = block.to(memory_format=torch.channels_last)
    cl = dict(memory_format=torch.channels_last)
    x, ctx, prior = (torch.randn(2, c, 9, 9).contiguous(**cl) for c in (8, 4, 4))
    _compare(block, [x, ctx, prior], monkeypatch)


@pytest.mark.parametrize("kernel,shape,channels_last", [(7, (2, 6, 9, 8), True), (13, (2, 4, 15, 14), False),
                                                        (5, (3, 5, 4, 6), True)])
def test_dilated_reparam_block_recomputes_exactly(kernel, shape, channels_last, monkeypatch):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    block = _randomize(DilatedReparamBlock(shape[1], kernel)).to(memory_format=fmt)
    _compare(block, [torch.randn(shape).contiguous(memory_format=fmt)], monkeypatch)


@pytest.mark.parametrize("whole_branch", [True, False])
@pytest.mark.parametrize("kernel,shape", [(13, (2, 8, 6, 7)), (17, (1, 16, 12, 12)), (13, (3, 24, 14, 13))])
def test_dilated_branches_differentiated_by_the_kernels(kernel, shape, whole_branch, monkeypatch):
    """Where the hand-written kernels run the branch convs, backward takes their gradients straight (no autograd
    graph per branch), kernels cropped to a small map included: the values of the plain graph. By default each
    branch's whole backward (conv rebuilt, BatchNorm, both conv gradients) is one native call, the input gradients
    summed in place; with that declined, the conv gradients alone come from the kernels."""
    from overlock import layers
    from overlock.ops import native
    if not native.available():
        pytest.skip(f"native kernels {native.status()}")
    monkeypatch.setattr(native, "NATIVE_ISAS", {native.cpu_isa()})
    calls, fused = [], []
    real, real_fused = layers.native_grads, native.bn_branch_backward
    monkeypatch.setattr(layers, "native_grads", lambda *a: calls.append(a[1].shape) or real(*a))
    monkeypatch.setattr(native, "bn_branch_backward", lambda *a: fused.append(a[1].shape) or real_fused(*a))
    if not whole_branch:
        monkeypatch.setattr(layers, "depthwise_bn_grads", lambda *a: None)
    block = _randomize(DilatedReparamBlock(shape[1], kernel)).to(memory_format=torch.channels_last)
    _compare(block, [torch.randn(shape).contiguous(memory_format=torch.channels_last)], monkeypatch)
    used = fused if whole_branch else calls
    assert len(used) == len(block.kernel_sizes) and not (calls if whole_branch else fused)
    assert any(tuple(s[-2:]) != (k, k) for s, k in zip(used, block.kernel_sizes)) == (min(shape[2:]) < 12)


def _scratch_forward_setup(monkeypatch):
    from overlock.ops import native
    if not native.available():
        pytest.skip(f"native kernels {native.status()}")
    monkeypatch.setattr(native, "NATIVE_ISAS", {native.cpu_isa()})
    block = _randomize(DilatedReparamBlock(16, 13)).to(memory_format=torch.channels_last).train()
    x = (torch.randn(2, 16, 15, 14) * 2 + 1).contiguous(memory_format=torch.channels_last)  # a mean off zero
    plain = copy.deepcopy(block)
    ran = []
    real = recompute._scratch_forward
    monkeypatch.setattr(recompute, "_scratch_forward", lambda *a: _noted(real(*a), ran))
    return block, plain, x, ran


def _plain_run(module, x, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(recompute, "enabled", lambda *a: False)
        return module(x)


def test_dilated_branches_training_forward_through_one_scratch_map(monkeypatch):
    """Where the kernels run the branch convs, the dilated branches' training forward goes through one scratch map
    (statistics kernel, one accumulating pass per branch): BatchNorm's values, running averages and gradients to
    float rounding, the batch counts exact."""
    block, plain, x, ran = _scratch_forward_setup(monkeypatch)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = block(xa)
    want = _plain_run(plain, xb, monkeypatch)
    assert ran == [True]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    for (name, a), b in zip(block.state_dict().items(), plain.state_dict().values()):
        if name.endswith("num_batches_tracked"):
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, msg=name)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [xa, *block.parameters()], g)
    ref = torch.autograd.grad(want, [xb, *plain.parameters()], g)
    scale = max(r.abs().max().item() for r in ref)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)


def test_dilated_branches_scratch_forward_declined_midway(monkeypatch):
    """A branch conv the kernel declines after others ran: the whole sum is taken again by PyTorch's ops, the
    running statistics updated once (the plain graph's very bits)."""
    from overlock import layers
    block, plain, x, ran = _scratch_forward_setup(monkeypatch)
    calls = []
    real = layers.depthwise_conv_into
    monkeypatch.setattr(layers, "depthwise_conv_into", lambda *a: calls.append(1) or (len(calls) < 3 and real(*a)))
    out = block(x.clone().requires_grad_())
    want = _plain_run(plain, x.clone().requires_grad_(), monkeypatch)
    assert ran == [False] and len(calls) == 3
    assert torch.equal(out, want)
    for (name, a), b in zip(block.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name


def test_dilated_reparam_block_keeps_only_its_input_and_the_large_kernel_output():
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    maps = _saved_maps(DilatedReparamBlock(4, 13).train(), x, x.numel())
    # x and lk_origin's output (its BatchNorm's input); the six dilated branches' outputs are rebuilt in backward
    assert len(maps) == 2
    assert x.untyped_storage().data_ptr() in maps


@pytest.mark.parametrize("input_grad", [True, False])
def test_dilated_reparam_block_with_frozen_parameters(input_grad, monkeypatch):
    """Some branches frozen (conv weight, BatchNorm scale), the input with or without a gradient: the same gradients
    for what does train, none for the rest."""
    block = _randomize(DilatedReparamBlock(6, 13)).to(memory_format=torch.channels_last).train()
    block.dil_conv_k5_1.weight.requires_grad_(False)
    block.dil_bn_k7_2.weight.requires_grad_(False)
    block.dil_bn_k3_4.bias.requires_grad_(False)
    x = torch.randn(2, 6, 16, 15).contiguous(memory_format=torch.channels_last)
    g = torch.randn(2, 6, 16, 15)
    state = {k: v.clone() for k, v in block.state_dict().items()}
    trained = [p for p in block.parameters() if p.requires_grad]
    results = []
    for plain in (True, False):
        block.load_state_dict(state)
        with monkeypatch.context() as m:
            if plain:
                m.setattr(recompute, "enabled", lambda *a: False)
            x_ = x.clone().requires_grad_(input_grad)
            results.append(torch.autograd.grad(block(x_), ([x_] if input_grad else []) + trained, g))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * a.abs().max().item())
    assert block.dil_conv_k5_1.weight.grad is None


def test_dilated_reparam_block_updates_running_statistics_once(monkeypatch):
    torch.manual_seed(0)
    block = DilatedReparamBlock(4, 7).train()
    x = torch.randn(2, 4, 10, 10, requires_grad=True)
    plain = DilatedReparamBlock(4, 7).train()
    plain.load_state_dict(block.state_dict())
    block(x).sum().backward()
    with monkeypatch.context() as m:
        m.setattr(recompute, "enabled", lambda *a: False)
        plain(x).sum().backward()
    for (name, a), b in zip(block.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name  # running means, variances and batch counts


@pytest.mark.parametrize("channels_last", [True, False])
def test_whole_model_training_gradients_unchanged(channels_last, monkeypatch):
    """A training step of the tiny registered model (aux head on): every parameter's gradient as without recompute."""
    import timm
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = _randomize(timm.create_model("test_overlock", use_ds=True, num_classes=5)).to(memory_format=fmt).train()
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=fmt)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    want, got = _model_grads(model, state, x, True, monkeypatch), _model_grads(model, state, x, False, monkeypatch)
    assert want.keys() == got.keys() and len(want) == sum(1 for _ in model.parameters())
    scale = max(g.abs().max().item() for g in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def _model_grads(model, state, x, plain, monkeypatch, autocast=None):
    """Parameter gradients of one training step from ``state``, with or without recompute."""
    model.load_state_dict(state)
    model.zero_grad()
    with monkeypatch.context() as m:
        if plain:
            m.setattr(recompute, "enabled", lambda *a: False)
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            logits, aux = model(x, return_aux=True)
            loss = logits.float().square().mean() + 0.4 * aux.float().square().mean()
        loss.backward()  # outside autocast, as in a training loop: the rebuilt ops must re-enter it
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}



def test_whole_model_training_under_bfloat16_autocast(monkeypatch):
    """Rebuilt activations re-enter the forward's autocast (``loss.backward()`` runs outside it): the step works and
    its gradients are as close to the float32 ones as the plain graph's under autocast."""
    import timm
    torch.manual_seed(0)
    model = _randomize(timm.create_model("test_overlock", use_ds=True, num_classes=5))
    model = model.to(memory_format=torch.channels_last).train()
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    exact = _model_grads(model, state, x, True, monkeypatch)
    plain = _model_grads(model, state, x, True, monkeypatch, autocast=torch.bfloat16)
    rebuilt = _model_grads(model, state, x, False, monkeypatch, autocast=torch.bfloat16)
    assert plain.keys() == rebuilt.keys() == exact.keys()

    def err(grads):
        diff = sum((grads[n] - exact[n]).norm() ** 2 for n in exact)
        return (diff / sum(g.norm() ** 2 for g in exact.values())).sqrt()

    assert 0 < err(plain) < 0.3  # bfloat16 keeps 8 bits
    assert err(rebuilt) < 1.25 * err(plain)
    assert sum(torch.equal(rebuilt[n], plain[n]) for n in plain) > len(plain) // 2  # mostly the very same ops


@pytest.mark.parametrize("channels_last", [False, True])
def test_recompute_inside_gradient_checkpointing(channels_last, monkeypatch):
    """Blocks run under torch.utils.checkpoint (``set_grad_checkpointing``) still give the plain gradients
    (channels_last: the native kernels' paths, the dilated branches' scratch forward and the GRN-MLP's scratch maps
    included)."""
    import timm
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = _randomize(timm.create_model("test_overlock", num_classes=5)).train().to(memory_format=fmt)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=fmt)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def grads(plain, ckpt):
        model.load_state_dict(state)
        model.zero_grad()
        model.set_grad_checkpointing(ckpt)
        with monkeypatch.context() as m:
            if plain:
                m.setattr(recompute, "enabled", lambda *a: False)
            model(x).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    want, got = grads(True, False), grads(False, True)
    scale = max(g.abs().max().item() for g in want)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * scale)


def test_recompute_can_be_turned_off():
    mlp = GrnMlp(4, 16).train()
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    try:
        recompute.set_enabled(False)
        assert type(mlp(x).grad_fn).__name__ not in TAIL_FUNCTIONS
    finally:
        recompute.set_enabled(True)
    assert type(mlp(x).grad_fn).__name__ == "_GrnMlpTailBackward"


TAIL_FUNCTIONS = ("_MlpTailBackward", "_GrnMlpTailBackward")
