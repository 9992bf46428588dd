"""Every neighbourhood-aggregation backend and fast layer against its plain definition: values and gradients."""
import pytest
import torch
import torch.nn.functional as F

import overlock
from overlock.contmix import context_mix, context_mix_reference, make_rpb
from overlock.layers import GRN, DilatedReparamBlock, PointwiseConv, ResDWConv, depthwise_conv
from overlock.ops.neighborhood import BACKENDS, na2d_av, na2d_av_naive, na2d_av_tiled

from conftest import rel_err

# (H, W, k): square and non-square maps, equal to the kernel, a little and much larger than it
SHAPES = [(5, 5, 5), (7, 7, 7), (13, 13, 13), (13, 13, 5), (7, 11, 5), (14, 14, 13), (9, 16, 7), (20, 17, 3),
          (30, 19, 5)]
FAST = [b for b in BACKENDS if b != "naive"]


def _inputs(H, W, k, B=2, G=3, C=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    attn = torch.randn(B, G, H, W, k * k, generator=g, dtype=torch.float64).softmax(-1)
    value = torch.randn(B, G, H, W, C, generator=g, dtype=torch.float64)
    return attn.requires_grad_(), value.requires_grad_()


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("H,W,k", SHAPES)
def test_backend_matches_naive_values_and_gradients(backend, H, W, k):
    attn, value = _inputs(H, W, k)
    ref = na2d_av_naive(attn, value, k)
    grad = torch.randn_like(ref)
    ref_ga, ref_gv = torch.autograd.grad(ref, (attn, value), grad)
    out = na2d_av(attn, value, k, backend)
    ga, gv = torch.autograd.grad(out, (attn, value), grad)
    assert rel_err(out, ref) < 1e-12
    assert rel_err(ga, ref_ga) < 1e-12 and rel_err(gv, ref_gv) < 1e-12


@pytest.mark.parametrize("tile", [3, 4, 8, 64])
def test_tiled_any_tile_size(tile):
    attn, value = _inputs(17, 12, 5)
    assert rel_err(na2d_av_tiled(attn, value, 5, tile=tile), na2d_av_naive(attn, value, 5)) < 1e-12


@pytest.mark.parametrize("chunk_bytes", [1, 3 * 8 * 81 * 81, 1 << 30])  # 1, 3 (of 2x3 = 6) and all pairs per chunk
def test_tiled_single_tile_without_autograd_in_chunks(chunk_bytes, monkeypatch):
    monkeypatch.setattr("overlock.ops.neighborhood.DENSE_CHUNK_BYTES", chunk_bytes)
    attn, value = _inputs(9, 9, 7, B=3, G=2)
    with torch.no_grad():
        out = na2d_av_tiled(attn, value, 7)
    assert rel_err(out, na2d_av_naive(attn, value, 7)) < 1e-12


@pytest.mark.parametrize("chunk_bytes", [1, 3 * 8 * 99 * 99, 1 << 30])
@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)])
def test_tiled_single_tile_backward_in_chunks(chunk_bytes, needs, monkeypatch):
    """The one-tile autograd path (dense weights rebuilt per chunk in backward) on a strided value view."""
    monkeypatch.setattr("overlock.ops.neighborhood.DENSE_CHUNK_BYTES", chunk_bytes)
    attn, _ = _inputs(9, 11, 5, B=3, G=2)
    # values as context_mix passes them: a permuted view of a channels_last map, one half of the channels
    nhwc = torch.randn(3, 9, 11, 2, 2, 4, dtype=torch.float64, requires_grad=needs[1])
    value = nhwc.permute(3, 0, 4, 1, 2, 5)[1]
    attn = attn.detach().requires_grad_(needs[0])
    out = na2d_av_tiled(attn, value, 5)
    ref = na2d_av_naive(attn, value, 5)
    grad = torch.randn_like(ref)
    inputs = [t for t, n in zip((attn, nhwc), needs) if n]
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(ref, inputs, grad)
    assert rel_err(out, ref) < 1e-12
    assert type(out.grad_fn).__name__ != "ScatterBackward0"
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-12


def test_map_smaller_than_kernel_is_a_clear_error():
    attn, value = _inputs(5, 5, 5)
    with pytest.raises(ValueError, match="at least 7x7"):
        na2d_av(attn[..., :1].expand(-1, -1, -1, -1, 49), value, 7, "tiled")


def _contmix_args(H, W, k=7, s=5, G=4, c=4, B=2, memory_format=torch.contiguous_format):
    g = torch.Generator().manual_seed(1)
    def t(*shape):
        return torch.randn(*shape, generator=g).contiguous(memory_format=memory_format) \
            if len(shape) == 4 else torch.randn(*shape, generator=g)
    proj = torch.nn.Conv2d(49, k * k + s * s, 1)
    query, key, value = t(B, G * c, H, W), t(B, G * c, 7, 7), t(B, 2 * G * c, H, W)
    rpb1, rpb2 = make_rpb(G, s), make_rpb(G, k)
    with torch.no_grad():
        rpb1.normal_(generator=g)
        rpb2.normal_(generator=g)
    leaves = [query, key, value, rpb1, rpb2, proj.weight, proj.bias]
    for x in leaves[:3]:
        x.requires_grad_()
    return dict(query=query, key=key, value=value, weight_proj=proj, rpb_small=rpb1, rpb_large=rpb2, smk_size=s,
                kernel_size=k, num_heads=G), leaves


@pytest.mark.parametrize("backend", ["tiled", "unfold", "naive"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("H,W", [(7, 7), (13, 13), (9, 14), (16, 16)])
def test_context_mix_matches_official_order(backend, memory_format, H, W):
    """Keys folded through weight_proj, any aggregation backend: the official function and gradients."""
    kw, leaves = _contmix_args(H, W, memory_format=memory_format)
    ref = context_mix_reference(**kw)
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, leaves, grad)
    out = context_mix(**kw, backend=backend)
    grads = torch.autograd.grad(out, leaves, grad)
    assert out.shape == ref.shape and rel_err(out, ref) < 1e-5
    if backend == "tiled":
        assert out.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("H,W", [(7, 7), (9, 14), (16, 16), (30, 30)])
def test_context_mix_without_autograd_matches_official_order(H, W, monkeypatch):
    """Inference runs softmax and aggregation per sample (one-tile maps) or as in training (larger maps): same values."""
    import overlock.contmix as cm
    calls = []
    real = cm.na2d_softmax_av
    monkeypatch.setattr(cm, "na2d_softmax_av", lambda *a: calls.append(1) or real(*a))
    kw, _ = _contmix_args(H, W, memory_format=torch.channels_last)
    ref = context_mix_reference(**kw)
    with torch.no_grad():
        out = context_mix(**kw, backend="tiled")
    assert calls, "the per-sample path was not tried"
    assert out.shape == ref.shape and rel_err(out, ref.detach()) < 1e-5
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("H,W,k,r", [(2, 2, 13, 1), (1, 1, 7, 1), (4, 3, 3, 5), (2, 5, 17, 1), (8, 8, 3, 7),
                                     (20, 20, 5, 2)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_cropped_depthwise_conv(H, W, k, r, memory_format):
    x = torch.randn(2, 6, H, W, dtype=torch.float64).contiguous(memory_format=memory_format).requires_grad_()
    w = torch.randn(6, 1, k, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    ref = F.conv2d(x, w, b, padding=r * (k // 2), dilation=r, groups=6)
    out = depthwise_conv(x, w, b, dilation=r)
    grad = torch.randn_like(ref)
    assert rel_err(out, ref) < 1e-12
    for a, b_ in zip(torch.autograd.grad(out, (x, w, b), grad), torch.autograd.grad(ref, (x, w, b), grad)):
        assert rel_err(a, b_) < 1e-12


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_fast_layers_match_definitions(memory_format):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64).contiguous(memory_format=memory_format).requires_grad_()
    pw = PointwiseConv(8, 5).double()
    ref = F.conv2d(x, pw.weight, pw.bias)
    out = pw(x)
    assert rel_err(out, ref) < 1e-12 and out.is_contiguous(memory_format=memory_format)
    dw = ResDWConv(8, 3).double()
    ref = x + F.conv2d(x, dw.weight, dw.bias, padding=1, groups=8)
    out = dw(x)
    assert rel_err(out, ref) < 1e-12
    assert rel_err(torch.autograd.grad(out.sum(), dw.weight)[0], torch.autograd.grad(ref.sum(), dw.weight)[0]) < 1e-12
    grn = GRN(8).double()
    with torch.no_grad():
        grn.gamma.normal_()
        grn.beta.normal_()
    gx = torch.linalg.vector_norm(x, ord=2, dim=(-1, -2), keepdim=True)
    ref = x * (grn.gamma * gx / (gx.mean(dim=1, keepdim=True) + 1e-6) + 1) + grn.beta
    assert rel_err(grn(x), ref) < 1e-12


def test_dilated_block_training_and_deploy_forms_on_small_maps():
    block = DilatedReparamBlock(4, 13).double().eval()
    for m in block.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 4, 3, 2, dtype=torch.float64)
    ref = block(x)
    block.reparameterize()
    assert rel_err(block(x), ref) < 1e-12


def test_backend_selection_round_trip():
    before = overlock.get_backend()
    with overlock.use_backend("unfold"):
        assert overlock.get_backend() == "unfold"
    assert overlock.get_backend() == before
    with pytest.raises(ValueError):
        overlock.set_backend("natten")


def test_window_biases_cached_in_inference_follow_the_weights():
    """Inference reuses the gathered position biases per map size; in-place weight edits and training see fresh ones."""
    from overlock.contmix import ContMixBlock
    torch.manual_seed(0)
    block = ContMixBlock(dim=32, kernel_size=7, smk_size=3, num_heads=2).eval()
    x = torch.randn(2, 32, 9, 9)
    with torch.inference_mode():
        exact = block(x)
    assert "_bias_cache" not in block.__dict__, "the exact (unfused) model must not cache"
    block.reparm()  # the deploy conversion turns the cache on
    with torch.inference_mode():
        first = block(x)
        assert len(block._bias_cache) == 1
        again = block(x)
    torch.testing.assert_close(first, exact, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    with torch.no_grad():
        block.rpb2.add_(torch.randn_like(block.rpb2))  # as load_state_dict would: in place
        block.weight_proj.bias.mul_(2.0)
        edited = block(x)
    block._bias_cache.clear()
    with torch.no_grad():
        recomputed = block(x)
    torch.testing.assert_close(edited, recomputed, rtol=0, atol=0)
    assert (edited - first).abs().max() > 1e-3
    out = block(x)  # grad mode: no cache, gradients reach the tables
    out.square().sum().backward()
    assert block.rpb2.grad is not None and block.rpb2.grad.abs().sum() > 0
    torch.testing.assert_close(out.detach(), recomputed, rtol=1e-5, atol=1e-6)


def test_window_biases_cache_never_outlives_a_training_step():
    """A fused model fine-tuned with fused AdamW (which writes parameters without moving their version counters)
    and validated after each step sees its new position biases."""
    from overlock.contmix import ContMixBlock
    torch.manual_seed(0)
    block = ContMixBlock(dim=32, kernel_size=7, smk_size=3, num_heads=2)
    block.reparm()
    x = torch.randn(2, 32, 9, 9)
    block.eval()
    with torch.no_grad():
        block(x)
    assert len(block._bias_cache) == 1
    block.train()
    assert "_bias_cache" not in block.__dict__
    block(x).square().sum().backward()
    fused = {"fused": True} if hasattr(torch, "_fused_adamw_") else {}
    torch.optim.AdamW(block.parameters(), lr=0.1, **fused).step()
    block.eval()
    with torch.no_grad():
        validated = block(x)
        block.cache_biases = False
        exact = block(x)
    torch.testing.assert_close(validated, exact, rtol=0, atol=0)


def test_dense_chunks_are_cache_sized_on_cpu_and_whole_batches_elsewhere():
    """The one-tile aggregation's chunking is a CPU cache trick; on a GPU 2 MB chunks meant ~20 launches of each
    op per call at batch 128 (training step 1008 -> 844 ms on an H200 without them)."""
    from overlock.ops.neighborhood import DENSE_CHUNK_BYTES, _pairs_per_chunk
    cpu, meta = torch.empty(1), torch.empty(1, device="meta")  # meta stands for any non-CPU device
    assert _pairs_per_chunk(cpu, 512, 196, 196) == DENSE_CHUNK_BYTES // (196 * 196 * 4) < 512
    assert _pairs_per_chunk(meta, 512, 196, 196) == 512
    assert _pairs_per_chunk(cpu.double(), 512, 196 * 64, 196 * 64) == 1  # at least one pair


def test_per_sample_contmix_only_on_cpu():
    from overlock.contmix import _per_sample_ok
    assert _per_sample_ok(torch.empty(2, 3), torch.empty(3))
    assert not _per_sample_ok(torch.empty(2, 3, device="meta"), torch.empty(3, device="meta"))
    assert not _per_sample_ok(torch.empty(2, 3), torch.empty(3, dtype=torch.float64))
