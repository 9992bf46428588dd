"""OverLoCK as a first-class timm model: registration, configs, training behaviour, errors."""
import pickle
import urllib.error

import pytest
import timm
import torch

import overlock
from overlock import OverLoCK

from conftest import DATA, rel_err

NAMES = [f"overlock_{v}{s}" for v in ("xt", "t", "s", "b") for s in ("", "_reparam")]


@pytest.fixture
def tiny(tiny_config):
    def make(name="overlock_t", **kwargs):
        args = dict(tiny_config)
        args.update(kwargs)
        return timm.create_model(name, **args)
    return make


def test_registered_with_official_configs():
    assert set(timm.list_models("overlock*")) == set(NAMES)
    crop = {"xt": 0.925, "t": 0.95, "s": 0.95, "b": 0.975}
    for name in NAMES:
        cfg = timm.models.get_pretrained_cfg(name)
        variant = name.split("_")[1]
        assert cfg.crop_pct == crop[variant]
        assert cfg.input_size == (3, 224, 224) and cfg.interpolation == "bicubic"
        assert cfg.mean == (0.485, 0.456, 0.406) and cfg.std == (0.229, 0.224, 0.225)
        suffix = "_reparam" if name.endswith("_reparam") else ""
        assert cfg.url == f"https://github.com/LMMMEng/OverLoCK/releases/download/v1/overlock_{variant}_in1k_224{suffix}.pth"


def test_tensor_output_and_gradients_reach_every_parameter(tiny):
    model = tiny(drop_path_rate=0.1).train()
    x = torch.randn(2, 3, 64, 48)
    out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)
    out.square().sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    model.eval()
    assert isinstance(model(x), torch.Tensor)


def test_deep_supervision_returns_both_heads_and_trains_them(tiny):
    model = tiny(use_ds=True).train()
    logits, aux = model(torch.randn(2, 3, 64, 64), return_aux=True)
    assert logits.shape == aux.shape == (2, 10)
    (logits.sum() + 0.4 * aux.sum()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    with pytest.raises(RuntimeError, match="use_ds=True"):
        tiny()(torch.randn(1, 3, 64, 64), return_aux=True)


def test_grad_checkpointing_gives_same_gradients(tiny):
    torch.manual_seed(0)
    a = tiny(use_ds=True).train()
    b = tiny(use_ds=True).train()
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64)
    for m in (a, b):
        logits, aux = m(x, return_aux=True)
        (logits.square().sum() + aux.square().sum()).backward()
    ga = dict(a.named_parameters())
    for n, p in b.named_parameters():
        assert torch.allclose(p.grad, ga[n].grad, rtol=1e-4, atol=1e-6), n


def test_per_stage_checkpointing_flag(tiny):
    model = tiny(use_checkpoint=[1, 0, 2, 1]).train()
    model(torch.randn(1, 3, 64, 64)).sum().backward()
    assert model.use_checkpoint == [1, 0, 2, 1]


def test_head_api(tiny):
    model = tiny(use_ds=True).eval()
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_features, 2, 2) and model.num_features == 96 + 24
    assert model.forward_head(feats, pre_logits=True).shape == (2, 64)
    assert torch.allclose(model.forward_head(feats), model(x), atol=1e-6)
    assert model.get_classifier() is model.head[4]
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model(x, return_aux=True)[1].shape == (2, 5)
    model.reset_classifier(0)
    assert model(x).shape == (2, 64)


def test_features_only(tiny):
    model = tiny(features_only=True).eval()
    feats = model(torch.randn(1, 3, 96, 64))
    assert [f.shape[1] for f in feats] == model.feature_info.channels() == [16, 32, 88, 120]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert [tuple(f.shape[2:]) for f in feats] == [(24, 16), (12, 8), (6, 4), (3, 2)]


def test_features_only_match_the_dense_backbone_before_its_norms(tiny_config, expected):
    model = timm.create_model("overlock_t", features_only=True, out_indices=(0,), pretrained=True, **tiny_config,
                              pretrained_cfg_overlay=dict(file=str(DATA / "classification.pth"), num_classes=10))
    dense = overlock.create_dense_backbone("overlock_t", "segmentation", DATA / "segmentation.pth", **tiny_config)
    with torch.no_grad():
        s1 = model.eval()(expected["input_0"])[0]
        assert rel_err(dense.extra_norm[0](s1), expected["segmentation_0_level0"]) < 1e-5


def test_fine_tuning_gets_fresh_heads_and_says_so(tiny_config, expected, tmp_path):
    with pytest.warns(UserWarning, match="fresh"):
        model = timm.create_model("overlock_t", pretrained=True, use_ds=True, **{**tiny_config, "num_classes": 3},
                                  pretrained_cfg_overlay=dict(file=str(DATA / "classification.pth")))
    assert model.head[4].weight.shape[0] == 3 and model.aux_head[2].weight.shape[0] == 3
    reference = OverLoCK(**tiny_config).eval()
    overlock.load_into(reference, DATA / "classification.pth")
    x = expected["input_0"]
    with torch.no_grad():  # everything but the classifier came from the file
        assert rel_err(model.eval().forward_features(x), reference.forward_features(x)) < 1e-6


def test_no_network_error_names_url_and_local_file_option(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(timm.models._builder, "download_cached_file", offline)
    with pytest.raises(RuntimeError) as info:
        timm.create_model("overlock_xt", pretrained=True)
    msg = str(info.value)
    assert "https://github.com/LMMMEng/OverLoCK/releases/download/v1/overlock_xt_in1k_224.pth" in msg
    assert "pretrained_cfg_overlay=dict(file=" in msg


def test_missing_file_is_named():
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        timm.create_model("overlock_xt", pretrained=True, pretrained_cfg_overlay=dict(file="nope.pth"))


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_arbitrary_pickles_are_refused(tmp_path, tiny):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "extra": _Payload()}, f)
    with pytest.raises(overlock.CheckpointError, match="evil.pth"):
        overlock.load_into(tiny(), path)


def test_safetensors_checkpoint(tmp_path, tiny_config, expected):
    from safetensors.torch import save_file
    state = torch.load(DATA / "classification.pth", weights_only=True)["state_dict"]
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    model = OverLoCK(**tiny_config).eval()
    overlock.load_into(model, path)
    with torch.no_grad():
        assert rel_err(model(expected["input_0"]), expected["logits_0"]) < 1e-5


@pytest.mark.parametrize("size", [(32, 32), (33, 47), (65, 31), (100, 77)])
def test_any_input_of_32px_or_more(tiny, size):
    model = tiny().eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        fast = model(x)
        with overlock.use_backend("unfold"):
            official_method = model(x)
    assert fast.shape == (1, 10) and rel_err(fast, official_method) < 1e-5


@pytest.mark.slow
def test_torch_compile(tiny):
    model = tiny(sub_depth=(1, 1)).eval()  # fewest blocks: compile time grows with the graph
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model)(x)
    assert rel_err(compiled, eager) < 1e-4


@pytest.mark.slow
def test_torch_compile_training_step(tiny):
    """Forward and backward compiled with default settings (one graph: index plans trace without graph breaks,
    which would otherwise re-enter frames with new shapes and trip inductor's dynamic-shape path)."""
    model = tiny(sub_depth=(1, 1)).train()
    x = torch.randn(2, 3, 64, 64)
    torch.compile(model)(x).square().sum().backward()
    compiled = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    model(x).square().sum().backward()
    eager = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert rel_err(compiled, eager) < 1e-3


def test_arbitrary_pickles_are_refused_on_timm_path(tmp_path):
    path = tmp_path / "evil2.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "extra": _Payload()}, f)
    with pytest.raises(overlock.CheckpointError, match="evil2.pth"):
        timm.create_model("overlock_xt", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_training_after_inference_mode():
    """Index plans first built under torch.inference_mode must not break a later training step."""
    import overlock.ops.neighborhood as nb

    nb._PLAN_CACHE.clear()
    model = timm.create_model("test_overlock", num_classes=3)
    with torch.inference_mode():
        model.eval()(torch.randn(1, 3, 64, 48))
    model.train()(torch.randn(2, 3, 64, 48)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_grn_gradient_is_finite_on_an_all_zero_map():
    """GRN's norm of an all-zero channel map has gradient 0 (torch.linalg.vector_norm), not NaN."""
    from overlock.layers import GRN

    grn = GRN(4)
    with torch.no_grad():
        grn.gamma.normal_()
    x = torch.randn(2, 4, 3, 3)
    x[0, 1] = 0
    x.requires_grad_(True)
    grn(x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(grn.gamma.grad).all()
    ref = x.detach().clone().requires_grad_(True)
    gx = torch.linalg.vector_norm(ref, dim=(-1, -2), keepdim=True)
    out = grn.beta + ref * (grn.gamma * gx / (gx.mean(dim=1, keepdim=True) + 1e-6) + 1)
    out.square().sum().backward()
    torch.testing.assert_close(x.grad, ref.grad)
    with torch.no_grad():  # the fast inference path gives the same values
        torch.testing.assert_close(grn(x), out.detach())
