"""The fuse step: each fused module equals its exact original, really runs, and the fused model stays exact."""

import pytest
import timm
import torch
from timm.utils import reparameterize_model

import overlock
from overlock import fused as F_
from overlock.fused_focus import FusedDynamicConvBlock
from overlock.layers import ConvNorm, GrnMlp, stem
from overlock.models.blocks import DynamicConvBlock, RepConvBlock
from overlock.ops import native

from conftest import DATA, rel_err

FORMATS = [torch.contiguous_format, torch.channels_last]
# the straight-line forwards (overlock/fused_native.py) call the native kernels
NATIVE_HERE = pytest.mark.skipif(not native.used_here(), reason="the native kernels do not run on this machine")


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics, GRN, LayerScale and position-bias parameters (all fold differently)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("gamma", "beta", "rpb1", "rpb2")) or ".ls" in name or name.startswith("ls"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif p.dim() == 1:  # norm weights and biases
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return module.eval()


def calls(module: torch.nn.Module, kind) -> list:
    """Count forward calls of every submodule of type ``kind`` (proof that the fused module ran)."""
    count = []
    for m in module.modules():
        if isinstance(m, kind):
            m.register_forward_hook(lambda *_: count.append(1))
    return count


@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("res_scale,ls", [(True, 0.5), (False, 0.5), (True, None)])
@pytest.mark.parametrize("chunk_bytes", [1, 8 << 20])  # one sample per chunk / the whole batch at once
def test_fused_repconv_block(memory_format, res_scale, ls, chunk_bytes, monkeypatch):
    monkeypatch.setattr(F_, "CHUNK_BYTES", chunk_bytes)
    block = randomize(RepConvBlock(8, 5, mlp_ratio=2, ls_init_value=ls, res_scale=res_scale))
    fused = block.fuse()
    assert isinstance(fused, F_.FusedRepConvBlock)
    ran = calls(fused, F_.FusedRepConvBlock)
    for size in (3, 16):  # map smaller / larger than the 1x1 widths: scaled map / per-sample folded weights
        x = torch.randn(3, 8, size, size).contiguous(memory_format=memory_format)
        with torch.no_grad():
            ref, out = block(x), fused(x)
        assert rel_err(out, ref) < 1e-5
    assert len(ran) == 2


def test_fused_repconv_block_chunks_write_into_one_output(monkeypatch):
    """Batch chunks without autograd: each chunk's result is written into its slice of one channels_last output
    (no concatenation; where the native forward runs, no copy either), the bits of the chunks computed apart and
    concatenated; with autograd the chunks are concatenated."""
    from overlock import fused_native
    from overlock.ops import native
    block = randomize(RepConvBlock(16, 5, mlp_ratio=2, ls_init_value=0.5, res_scale=True))
    fused = block.fuse()
    x = torch.randn(5, 16, 9, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        whole = torch.cat([fused._forward(x[i:i + 1]) for i in range(5)])
    monkeypatch.setattr(F_, "CHUNK_BYTES", 1)  # one sample per chunk
    into = []
    real = fused_native.repconv_block

    def spy(block, x, out=None):
        got = real(block, x, out)
        into.append(out is not None and got is out)
        return got

    monkeypatch.setattr(fused_native, "repconv_block", spy)
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: pytest.fail("concatenated") if torch.is_tensor(
        a[0][0]) and a[0][0].shape[0] == 1 and len(a[0]) == 5 else real_cat(*a, **k))
    with torch.no_grad():
        chunked = fused(x)
    assert torch.equal(chunked, whole) and chunked.is_contiguous(memory_format=torch.channels_last)
    if native.used_here():
        assert into == [True] * 5
    monkeypatch.setattr(torch, "cat", real_cat)
    xg = x.clone().requires_grad_()
    out = fused(xg)
    out.sum().backward()
    assert rel_err(out.detach(), whole) < 1e-6 and xg.grad is not None


@NATIVE_HERE
@pytest.mark.parametrize("res_scale,ls", [(True, 0.5), (False, 0.5), (True, None)])
@pytest.mark.parametrize("B,chunk_bytes", [(1, 8 << 20), (2, 8 << 20), (3, 1)])
def test_repconv_block_native_forward_gives_the_general_forwards_bits(res_scale, ls, B, chunk_bytes, monkeypatch):
    """``fused_native.repconv_block`` against the block's general forward (the native route off): the same bits for
    every LayerScale fold, batch and chunking (chunks written into one output), on maps where SE's gate scales the
    map (4x4), the first 1x1's weights (6x6), where GRN's scale is applied to the map (3x3) and where the GRN conv
    runs in place (28x28); declined where autograd records or the map is not channels_last."""
    from overlock import fused_native
    monkeypatch.setattr(F_, "CHUNK_BYTES", chunk_bytes)
    block = randomize(RepConvBlock(16, 7, mlp_ratio=2, ls_init_value=ls, res_scale=res_scale))
    fused = block.fuse()
    real, ran = fused_native.repconv_block, []

    def spy(*args):
        out = real(*args)
        ran.append(out is not None)
        return out

    monkeypatch.setattr(fused_native, "repconv_block", spy)
    for size in (3, 4, 6, 28):
        x = torch.randn(B, 16, size, size).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            out = fused(x)
            monkeypatch.setattr(fused_native, "repconv_block", lambda *a: None)
            want = fused(x)
            monkeypatch.setattr(fused_native, "repconv_block", spy)
            ref = block(x)
        assert ran and all(ran) and torch.equal(out, want) and out.stride() == want.stride()
        assert rel_err(out, ref) < 1e-5
        ran.clear()
    fused(x)  # autograd records
    with torch.no_grad():
        fused(x.contiguous())
    assert not any(ran)


@NATIVE_HERE
def test_fused_gemm_weights_are_stored_transposed_and_run_straight_line(monkeypatch):
    """The fused blocks keep the weights only their GEMMs read as transposes of contiguous ``(Cin, Cout)`` matrices
    (MKL's faster driver for few rows), every other parameter contiguous (the kernels read those by address); the
    straight-line forwards take them, on a 7x7 map, and give a row-major copy's values to float rounding."""
    import copy

    from overlock import fused_native
    focus = randomize(DynamicConvBlock(32, 32, kernel_size=5, smk_size=3, num_heads=1, mlp_ratio=2)).fuse()
    rep = randomize(RepConvBlock(16, 7, mlp_ratio=2)).fuse()
    cl = torch.channels_last
    x7 = torch.randn(1, 32, 7, 7).contiguous(memory_format=cl)
    ctx, prior = (torch.randn(1, 8, 7, 7).contiguous(memory_format=cl) for _ in range(2))
    cases = [(focus, fused_native._FOCUS_GEMM_WEIGHTS, "focus_block", (x7, ctx, prior)),
             (rep, fused_native._REPCONV_GEMM_WEIGHTS, "repconv_block", (x7[:, :16].contiguous(memory_format=cl),))]
    for block, gemm, entry, args in cases:
        params = dict(block.named_parameters())
        assert gemm <= set(params)
        for name, p in params.items():
            if name in gemm:
                assert p.dim() == 2 and p.t().is_contiguous() and not p.is_contiguous(), name
            else:
                assert p.is_contiguous(), name
        real, ran = getattr(fused_native, entry), []
        monkeypatch.setattr(fused_native, entry, lambda *a, _real=real: ran.append(_real(*a)) or ran[-1])
        row_major = copy.deepcopy(block)._apply(lambda t: t.contiguous())
        with torch.no_grad():
            out, want = block(*args), row_major(*args)
        assert len(ran) == 2 and all(r is not None for r in ran)
        out, want = (o[0] if isinstance(o, tuple) else o for o in (out, want))
        assert rel_err(out, want) < 1e-6


@pytest.mark.parametrize("memory_format", FORMATS)
def test_fused_conv_norm_sequences(memory_format):
    """Stem (conv-BN-GELU x3), BN-then-1x1, dilated block + BN, conv-BN-SiLU: folded, same function."""
    from overlock.layers import DilatedReparamBlock, PointwiseConv, conv_bn
    cases = [
        (stem(3, 16), torch.randn(2, 3, 20, 24)),
        (ConvNorm(torch.nn.BatchNorm2d(8), PointwiseConv(8, 6)), torch.randn(2, 8, 5, 7)),
        (ConvNorm(DilatedReparamBlock(8, 7), torch.nn.BatchNorm2d(8)), torch.randn(2, 8, 4, 9)),
        (conv_bn(8, 8, torch.nn.SiLU()), torch.randn(2, 8, 5, 5)),
    ]
    for seq, x in cases:
        seq = randomize(seq)
        x = x.contiguous(memory_format=memory_format)
        fused = seq.fuse()
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
        with torch.no_grad():
            assert rel_err(fused(x), seq(x)) < 1e-5
    # indices are kept: a folded BatchNorm leaves an Identity in its place
    assert [type(m).__name__ for m in stem(3, 16).fuse()][:3] == ["PackedConv", "Identity", "InplaceAct"]


@pytest.mark.parametrize("memory_format", FORMATS)
def test_fused_grn_mlp(memory_format):
    mlp = randomize(GrnMlp(8, 16))
    fused = mlp.fuse()
    ran = calls(fused, F_.FusedGrnMlp)
    x = torch.randn(2, 8, 6, 5).contiguous(memory_format=memory_format)
    with torch.no_grad():
        assert rel_err(fused(x), mlp(x)) < 1e-5
    assert ran == [1]


@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("res_scale,ls", [(True, 0.5), (False, 0.5), (True, None)])
@pytest.mark.parametrize("place", ["first", "middle", "last"])
def test_fused_focus_block(memory_format, res_scale, ls, place):
    """The Focus-Net block's flat inference form: the same function for every LayerScale fold and block position,
    on maps smaller than the kernel (resized up, pooled back) and larger; gradients still reach every weight."""
    block = randomize(DynamicConvBlock(8, 16, kernel_size=5, smk_size=3, num_heads=1, mlp_ratio=2,
                                       ls_init_value=ls, res_scale=res_scale, is_first=place == "first",
                                       is_last=place == "last"))
    fused = block.fuse()
    assert isinstance(fused, FusedDynamicConvBlock)
    ran = calls(fused, FusedDynamicConvBlock)
    for size in (3, 9):
        x = torch.randn(2, 8, size, size).contiguous(memory_format=memory_format)
        ctx, prior = torch.randn(2, 4, size, size), torch.randn(2, 4, size, size)
        with torch.no_grad():
            ref, out = block(x, ctx, prior), fused(x, ctx, prior)
        assert (out[1] is None) == (ref[1] is None) == (place == "last")  # the last block returns no context
        assert rel_err(out[0], ref[0]) < 1e-5
        if ref[1] is not None:
            assert rel_err(out[1], ref[1]) < 1e-5
    assert len(ran) == 2
    out = fused(x, ctx, prior)
    (out[0].square().sum() + (0 if out[1] is None else out[1].sum())).backward()
    assert [n for n, p in fused.named_parameters() if p.grad is None] == []


@NATIVE_HERE
@pytest.mark.parametrize("res_scale,ls", [(True, 0.5), (False, 0.5), (True, None)])
@pytest.mark.parametrize("place", ["first", "middle", "last"])
@pytest.mark.parametrize("B", [1, 2])
def test_focus_block_native_forward_gives_the_general_forwards_bits(res_scale, ls, place, B, monkeypatch):
    """``fused_native.focus_block``, the straight-line inference forward, against the block's general forward (the
    native route switched off): the same bits for every LayerScale fold, position and batch, on maps where GRN's
    scale and SE's are applied to the map (6x6), to the weights (7x7) and where the GRN conv runs in place (28x28);
    and it declines where autograd records, a hook would be skipped, the input is not channels-innermost or the
    ContMix backend is another."""
    from overlock import fused_native
    block = randomize(DynamicConvBlock(32, 32, kernel_size=5, smk_size=3, num_heads=1, mlp_ratio=2,
                                       ls_init_value=ls, res_scale=res_scale, is_first=place == "first",
                                       is_last=place == "last"))
    fused = block.fuse().to(memory_format=torch.channels_last)
    native_forward, ran = fused_native.focus_block, []

    def spy(*args):
        out = native_forward(*args)
        ran.append(out is not None)
        return out

    def general(*args):
        monkeypatch.setattr(fused_native, "focus_block", lambda *a: None)
        try:
            return fused(*args)
        finally:
            monkeypatch.setattr(fused_native, "focus_block", spy)

    monkeypatch.setattr(fused_native, "focus_block", spy)
    cl = torch.channels_last
    for size in (6, 7, 28):
        x = torch.randn(B, 32, size, size).contiguous(memory_format=cl)
        ctx, prior = (torch.randn(B, 8, size, size).contiguous(memory_format=cl) for _ in range(2))
        with torch.no_grad():
            out, want, ref = fused(x, ctx, prior), general(x, ctx, prior), block(x, ctx, prior)
        assert ran.pop() and len(out) == 2 and (out[1] is None) == (place == "last")
        for o, w, r in zip(out, want, ref):
            if r is None:
                continue
            assert torch.equal(o, w) and o.stride() == w.stride()
            assert rel_err(o, r) < 1e-5
    fused(x, ctx, prior)  # autograd records
    with torch.no_grad():
        fused.double()  # a cast drops the route: float64 weights are refused (and the general forward runs)
        double = fused(x.double(), ctx.double(), prior.double())
        fused.float()
        assert rel_err(double[0], out[0]) < 1e-5
        fused(x.contiguous(), ctx, prior)  # channels not innermost
        # the module's tensors re-laid out (column-major matrices): the route is decided again and declines
        fused._apply(lambda t: t.t().contiguous().t() if t.dim() == 2 else t)
        relaid = fused(x, ctx, prior)
        assert all(r is None or rel_err(r, o) < 1e-5 for r, o in zip(relaid, out))
        fused._apply(lambda t: t.contiguous())
        with overlock.use_backend("unfold"):
            fused(x, ctx, prior)
        handle = fused.lepe.register_forward_hook(lambda *_: None)
        fused(x, ctx, prior)
        handle.remove()
        fused(x, ctx, prior)
    assert ran == [False, False, False, False, False, False, True]


@NATIVE_HERE
@pytest.mark.parametrize("place", ["first", "middle", "last"])
@pytest.mark.parametrize("B", [1, 3])
def test_blocks_run_as_one_native_call_with_the_op_by_op_bits(place, B, monkeypatch):
    """Each fused block runs as one C call (csrc/blocks_avx2.c; the 1x1s through PyTorch's own BLAS routines): the
    bits of the op-by-op straight-line forward, on maps where GRN's and SE's scales go to the map (6x6) or to the
    weights (7x9, not square; per sample above batch 1) and where the GRN conv runs in place (28x28), with the 1x1
    weights as stored (transposed) and row-major. A refused call leaves the op-by-op forward to run."""
    from overlock import fused_native
    if native.whole_blocks() is None:
        pytest.skip("no sgemm_ in PyTorch's library here, or not its products' bits")
    focus = randomize(DynamicConvBlock(32, 32, kernel_size=5, smk_size=3, num_heads=1, mlp_ratio=2, ls_init_value=0.5,
                                       is_first=place == "first", is_last=place == "last")).fuse()
    rep = randomize(RepConvBlock(16, 7, mlp_ratio=2, ls_init_value=0.5)).fuse()
    codes = []
    for name in ("_focus_call", "_repconv_call"):
        real = getattr(fused_native, name)
        monkeypatch.setattr(fused_native, name, lambda *a, _real=real: codes.append(_real(*a)) or codes[-1])

    def whole_and_op_by_op(block, *args):
        outs = []
        with torch.no_grad():
            for whole in (True, False):
                monkeypatch.setattr(fused_native, "WHOLE_BLOCK_CALLS", whole)
                out = block(*args)
                outs.append([o for o in (out if isinstance(out, tuple) else (out,)) if o is not None])
        monkeypatch.setattr(fused_native, "WHOLE_BLOCK_CALLS", True)
        return outs

    cl = torch.channels_last
    for layout in ("stored", "row-major"):
        if layout == "row-major":
            for block in (focus, rep):
                block._apply(lambda t: t.contiguous())
            assert not fused_native._t(rep.mlp.fc1_weight) and not fused_native._t(focus.proj_weight)
        else:
            assert fused_native._t(rep.mlp.fc1_weight) and fused_native._t(focus.proj_weight)
        for size in ((6, 6), (7, 9), (28, 28)):
            x = torch.randn(B, 32, *size).contiguous(memory_format=cl)
            ctx, prior = (torch.randn(B, 8, *size).contiguous(memory_format=cl) for _ in range(2))
            for block, args in ((focus, (x, ctx, prior)), (rep, (x[:, :16].contiguous(memory_format=cl),))):
                out, want = whole_and_op_by_op(block, *args)
                assert codes.pop() == 0 and not codes, (layout, size)
                assert len(out) == len(want) and all(torch.equal(o, w) and o.stride() == w.stride()
                                                     for o, w in zip(out, want))
    with torch.no_grad():
        monkeypatch.setattr(fused_native, "_focus_call", lambda *a: codes.append(-1) or -1)
        refused, want = whole_and_op_by_op(focus, x, ctx, prior)
    assert codes == [-1] and all(torch.equal(o, w) for o, w in zip(refused, want))


@NATIVE_HERE
def test_whole_block_product_check_catches_other_bits():
    """``native._same_products`` (and its batched twin) pass the C products here and refuse one whose first value is
    off by an ulp."""
    import ctypes

    lib = native.whole_blocks()
    if lib is None:
        pytest.skip("no whole-block calls here")
    assert native._same_products(lib) and native._same_batched_products(lib)

    def off_by_one(product):
        def call(out, *args):
            rc = product(out, *args)
            value = ctypes.c_float.from_address(out)
            value.value = float(torch.nextafter(torch.tensor(value.value), torch.tensor(float("inf"))))
            return rc
        return staticmethod(call)

    class OffByOne:
        overlock_blocks_linear = off_by_one(lib.overlock_blocks_linear)
        overlock_blocks_batch_linear = off_by_one(lib.overlock_blocks_batch_linear)

    assert not native._same_products(OffByOne()) and not native._same_batched_products(OffByOne())


def test_fused_contmix_block():
    """The plug-and-play ContMix block keeps its own forward; its projections, LePE, gate and MLP are fused."""
    block = overlock.ContMixBlock(8, kernel_size=5, smk_size=3, num_heads=1, mlp_ratio=2, ls_init_value=0.5)
    block = randomize(block)
    fused = overlock.fuse(block)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    ran = calls(fused, F_.FusedGrnMlp)
    for size in (3, 9):  # 3: smaller than the kernel (resized up, pooled back)
        x = torch.randn(2, 8, size, size).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            assert rel_err(fused(x), block(x)) < 1e-5
    assert len(ran) == 2


def _tiny_model(tiny_config, **kwargs):
    model = overlock.OverLoCK(**tiny_config, **kwargs).eval()
    overlock.load_into(model, DATA / "classification.pth")
    return model


@pytest.mark.parametrize("memory_format", FORMATS)
def test_fused_model_reproduces_official_logits(tiny_config, expected, memory_format):
    model = _tiny_model(tiny_config, use_ds=True)
    fused = reparameterize_model(model)  # timm's walk finds the same fuse() methods as overlock.fuse
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules() if m is not fused.aux_head[0])
    ran = calls(fused, (F_.FusedRepConvBlock, FusedDynamicConvBlock))
    fused = fused.to(memory_format=memory_format)
    with torch.no_grad():
        for i in (0, 1):
            out = fused(expected[f"input_{i}"].contiguous(memory_format=memory_format))
            assert rel_err(out, expected[f"logits_{i}"]) < 1e-5
            assert rel_err(out, expected[f"logits_reparam_{i}"]) < 1e-5
    assert len(ran) == 2 * (4 + 3)  # 4 RepConvBlocks and 3 Focus-Net blocks per forward
    # the exact model is untouched
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.blocks1.modules())


def test_fuse_is_idempotent_and_copies(tiny_config, expected):
    model = _tiny_model(tiny_config)
    once = overlock.fuse(model)
    twice = overlock.fuse(once)
    with torch.no_grad():
        assert rel_err(twice(expected["input_0"]), expected["logits_0"]) < 1e-5
    assert overlock.fuse(model, inplace=True) is model


def test_fused_model_copied_under_inference_mode_runs():
    """A fused model deep-copied inside ``torch.inference_mode`` (its parameters become inference tensors, which
    have no version counter) runs, with the kernels' kept weight layouts keyed without one."""
    import copy
    torch.manual_seed(0)
    model = overlock.fuse(timm.create_model("test_overlock").eval()).to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        want = model(x)
        twin = copy.deepcopy(model)
        assert all(p.is_inference() for p in twin.parameters())
        assert torch.equal(twin(x), want)


def test_fused_model_keeps_timm_names_and_gradients():
    """``_reparam`` models come fused: timm's generic checks (first conv, classifier, backward) still hold."""
    model = timm.create_model("test_overlock_reparam" if "test_overlock_reparam" in timm.list_models()
                              else "overlock_xt_reparam", num_classes=7)
    state = model.state_dict()
    cfg = model.pretrained_cfg
    assert cfg["first_conv"] + ".weight" in state and cfg["classifier"] + ".weight" in state
    assert any(isinstance(m, F_.FusedRepConvBlock) for m in model.modules())
    model.train()
    model(torch.randn(1, 3, 64, 64)).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, model.head_hidden_size)


def test_reparam_model_fuse_false_is_the_official_deploy_form(tiny_config, expected):
    model = timm.create_model("overlock_t_reparam", fuse=False, **tiny_config)
    official = torch.load(DATA / "classification_reparam.pth", weights_only=True)["state_dict"]
    assert set(model.state_dict()) == {k for k in official if not k.startswith("aux_head")}
    overlay = dict(file=str(DATA / "classification_reparam.pth"), num_classes=10)
    fused = timm.create_model("overlock_t_reparam", pretrained=True, **tiny_config, pretrained_cfg_overlay=overlay)
    with torch.no_grad():
        assert rel_err(fused(expected["input_1"]), expected["logits_reparam_1"]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fuse", [False, True])
def test_mixed_precision_inference(tiny_config, expected, dtype, fuse):
    """Autocast inference (the GPU fp16 path too) runs and stays close to float32."""
    model = _tiny_model(tiny_config)
    model = overlock.fuse(model) if fuse else model
    x = expected["input_0"].contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        out = model(x)
    assert out.dtype == dtype
    assert rel_err(out.float(), expected["logits_0"]) < 0.05


def test_pretrained_cfg_classifier_names_existing_layers():
    for name in timm.list_models("overlock*") + ["test_overlock"]:  # the classifiers
        with torch.device("meta"):
            model = timm.create_model(name)
        state = model.state_dict()
        classifier = model.pretrained_cfg["classifier"]
        for c in (classifier,) if isinstance(classifier, str) else classifier:
            assert c + ".weight" in state, (name, c)


def test_forward_intermediates_stop_early_and_norm():
    model = timm.create_model("test_overlock").eval()
    x = torch.randn(1, 3, 64, 64)
    ran = calls(model, DynamicConvBlock)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        assert len(ran) == 3
        last, early = model.forward_intermediates(x, indices=[1], stop_early=True)
        assert len(ran) == 3  # the Focus-Net never ran
        assert torch.equal(early[0], feats[1]) and torch.equal(last, feats[1])
        only = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
        assert len(ran) == 3 + 2  # stage 3 of the Focus-Net only
        assert torch.equal(only[1], feats[2])
    with pytest.raises(ValueError, match="norm"):
        model.forward_intermediates(x, norm=True)
    features = timm.create_model("test_overlock", features_only=True, out_indices=(1, 2))
    assert features.feature_info.channels() == [32, 88]


@pytest.mark.parametrize("memory_format", FORMATS)
def test_fused_se_is_the_same_gate(memory_format):
    """SE's MLP on the pooled ``(B, C)`` vector (fused) equals the official 1x1 convs on ``(B, C, 1, 1)`` maps."""
    from overlock.layers import SEModule
    torch.manual_seed(0)
    se = randomize(SEModule(32))
    with torch.no_grad():
        for p in se.parameters():
            p.normal_()
    fused = se.fuse()
    assert isinstance(fused, F_.FusedSE)
    x = torch.randn(3, 32, 5, 7).contiguous(memory_format=memory_format)
    with torch.no_grad():
        assert fused.scale(x).shape == (3, 32, 1, 1)
        assert rel_err(fused.scale(x), se.scale(x)) < 1e-6
        assert rel_err(fused(x), se(x)) < 1e-6


def test_pointwise_conv_on_a_channel_slice_is_one_gemm(monkeypatch):
    """A channel slice of a channels_last map (ContMix's query half) takes the GEMM path, with conv's values."""
    from overlock.layers import PointwiseConv
    torch.manual_seed(0)
    conv = PointwiseConv(16, 8)
    x = torch.randn(2, 24, 5, 6).contiguous(memory_format=torch.channels_last)[:, :16]
    assert not x.is_contiguous(memory_format=torch.channels_last)
    gemm = []
    real = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: gemm.append(1) or real(*a))
    with torch.no_grad():
        out = conv(x)
        ref = torch.nn.functional.conv2d(x.double(), conv.weight.double(), conv.bias.double())
    assert gemm and rel_err(out, ref) < 1e-6 and out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs PyTorch's oneDNN")
def test_packed_conv_packs_per_shape_and_follows_its_weight():
    """A dense conv with a large weight runs on oneDNN's pre-laid-out weight: the conv's values, one pack per input
    shape, rebuilt after an in-place update, left out of copies; autograd takes nn.Conv2d's forward."""
    import copy
    torch.manual_seed(0)
    conv = F_.PackedConv(256, 512, 3, stride=2, padding=1).eval().to(memory_format=torch.channels_last)
    assert conv.weight.numel() * 4 >= F_.PACK_MIN_BYTES

    def check(x):
        with torch.no_grad():
            want = torch.nn.functional.conv2d(x, conv.weight, conv.bias, 2, 1)
            torch.testing.assert_close(conv(x), want, rtol=1e-5, atol=1e-5)

    xs = [torch.randn(b, 256, 14, 14).contiguous(memory_format=torch.channels_last) for b in (1, 3)]
    for x in xs:
        check(x)
    packs = conv.__dict__["_packs"][1]
    assert set(packs) == {(1, 256, 14, 14), (3, 256, 14, 14)} and all(p is not None for p in packs.values())
    with torch.no_grad():
        conv.weight.mul_(-1)
    check(xs[0])
    assert set(conv.__dict__["_packs"][1]) == {(1, 256, 14, 14)}
    # a channel slice of a channels_last map (the Focus-Net's output halves): copied dense, then the packed call
    wide = torch.randn(1, 384, 14, 14).contiguous(memory_format=torch.channels_last)
    calls, real = [], torch.ops.mkldnn._convolution_pointwise
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch.ops.mkldnn, "_convolution_pointwise", lambda *a: calls.append(1) or real(*a))
        check(wide[:, :256])
    assert calls
    assert set(conv.__dict__["_packs"][1]) == {(1, 256, 14, 14)} and not wide[:, :256].is_contiguous(
        memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(conv(wide[:, :256]), conv(wide[:, :256].contiguous(memory_format=torch.channels_last)))
    assert "_packs" not in copy.deepcopy(conv).__dict__
    y = conv(xs[0])
    assert y.grad_fn is not None and "Packed" not in type(y.grad_fn).__name__
    # a torch whose private oneDNN entry point fails: nn.Conv2d's forward, once per shape
    real = torch.ops.mkldnn._convolution_pointwise
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch.ops.mkldnn, "_convolution_pointwise", lambda *a: (_ for _ in ()).throw(RuntimeError("x")))
        xs2 = torch.randn(2, 256, 14, 14).contiguous(memory_format=torch.channels_last)
        check(xs2)
        assert conv.__dict__["_packs"][1][(2, 256, 14, 14)] is None
    assert torch.ops.mkldnn._convolution_pointwise is real
    # small weights keep nn.Conv2d's call (pre-laid-out can be several times slower there)
    small = F_.PackedConv(8, 8, 3, padding=1).eval()
    with torch.no_grad():
        small(torch.randn(1, 8, 6, 6).contiguous(memory_format=torch.channels_last))
    assert "_packs" not in small.__dict__


@pytest.mark.parametrize("B,size,scaled", [(1, 6, True), (3, 6, True), (2, 3, True), (2, 6, False)])
@pytest.mark.parametrize("ls", [False, True])
def test_pointwise_scaled_add_is_the_1x1_plus_residual(B, size, scaled, ls):
    """A block's last 1x1 accumulated into its residual (``fused.pointwise_scaled_add``): per-sample input scales at
    batch 1 and above, a map with fewer pixels than output channels, a LayerScale on the identity; the identity is
    updated in place without autograd and left alone with it."""
    g = torch.Generator().manual_seed(B * 10 + size)
    cl = torch.channels_last
    x = torch.randn(B, 8, size, size, generator=g).contiguous(memory_format=cl)
    w, b = torch.randn(16, 8, generator=g), torch.randn(16, generator=g)
    scale = torch.rand(B, 8, 1, 1, generator=g) + 0.5 if scaled else None
    lw = torch.rand(1, 16, 1, 1, generator=g) + 0.5 if ls else None
    identity = torch.randn(B, 16, size, size, generator=g).contiguous(memory_format=cl)
    xs = x.double() * (1 if scale is None else scale.double())
    want = torch.einsum("bchw,oc->bohw", xs, w.double()) + b.double().view(1, -1, 1, 1)
    want = want + identity.double() * (1 if lw is None else lw.double())
    with torch.no_grad():
        acc = identity.clone()
        got = F_.pointwise_scaled_add(w, b, x, acc, scale=scale, identity_weight=lw)
        assert got is acc and rel_err(got, want) < 1e-6
    xg = x.clone().requires_grad_()
    got = F_.pointwise_scaled_add(w, b, xg, identity, scale=scale, identity_weight=lw)
    assert got is not identity and got.grad_fn is not None and rel_err(got.detach(), want) < 1e-6


def test_focus_block_gate_and_lepe_sum_keep_gradients():
    """The fused Focus-Net block's ``SiLU(gate) * mixed`` and ``lepe + 1x1(cm)``: in place (and native) only where
    no gradient is recorded; a gradient through either operand alone still arrives."""
    from overlock.fused_focus import _linear_add, _silu_mul
    cl = torch.channels_last
    g = torch.Generator().manual_seed(0)
    gate, mixed = (torch.randn(2, 16, 5, 5, generator=g).contiguous(memory_format=cl) for _ in range(2))
    want = torch.nn.functional.silu(gate.double()) * mixed.double()
    with torch.no_grad():
        g0 = gate.clone()
        assert _silu_mul(g0, mixed) is g0 and rel_err(g0, want) < 1e-6
    m = mixed.clone().requires_grad_()
    out = _silu_mul(gate.clone(), m)
    out.sum().backward()
    assert rel_err(out.detach(), want) < 1e-6 and rel_err(m.grad, torch.nn.functional.silu(gate.double())) < 1e-6
    w = torch.randn(16, 8, generator=g)
    cm = torch.randn(2, 8, 5, 5, generator=g).contiguous(memory_format=cl)
    want = mixed.double() + torch.einsum("bchw,oc->bohw", cm.double(), w.double())
    with torch.no_grad():
        acc = mixed.clone()
        assert _linear_add(cm, w, acc) is acc and rel_err(acc, want) < 1e-6
    c = cm.clone().requires_grad_()
    acc = mixed.clone()
    out = _linear_add(c, w, acc)
    out.sum().backward()
    assert torch.equal(acc, mixed) and rel_err(out.detach(), want) < 1e-6
    assert rel_err(c.grad, w.double().sum(0).view(1, -1, 1, 1).expand_as(cm)) < 1e-6


def test_timm_reparameterize_keeps_the_mode_and_the_bias_cache(tiny_config, monkeypatch):
    """``timm.utils.reparameterize_model`` (the benchmark's deploy step) swaps in our fused modules without calling
    ``eval()``: each fused module takes the mode of the module it replaces, so an eval model stays in eval mode
    throughout and its Focus-Net blocks keep their window biases between calls (they were rebuilt on every call:
    ~5 ms of a batch-1 overlock_t forward)."""
    import overlock.contmix as contmix
    model = reparameterize_model(overlock.OverLoCK(**tiny_config).eval())
    assert not any(m.training for m in model.modules())
    assert all(m.training for m in reparameterize_model(overlock.OverLoCK(**tiny_config).train()).modules())
    calls, real = [], contmix.window_biases
    monkeypatch.setattr(contmix, "window_biases", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model(x)
        assert calls
        calls.clear()
        model(x)
    assert not calls
