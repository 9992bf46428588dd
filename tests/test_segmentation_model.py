"""UperNet + OverLoCK against mmsegmentation 0.30's own outputs (tests/data/upernet_*), the full-size official
key layout, checkpoint handling, and the timm dense features for hosts such as segmentation_models_pytorch."""
from __future__ import annotations

import gzip
import json
import types
import warnings

import numpy as np
import pytest
import timm
import torch

import overlock
from overlock.segmentation import create_segmentation_model
from overlock.weights import CheckpointError

from conftest import DATA, rel_err


@pytest.fixture(scope="module")
def upernet_cfg():
    return json.loads((DATA / "upernet_config.json").read_text())


@pytest.fixture(scope="module")
def upernet_expected():
    with np.load(DATA / "upernet_expected.npz") as f:
        return {k: torch.from_numpy(f[k]) for k in f.files}


def _tiny(cfg, checkpoint=None, **kw):
    return create_segmentation_model("test_overlock", num_classes=cfg["num_classes"], checkpoint=checkpoint,
                                     channels=cfg["decode_channels"], aux_channels=cfg["aux_channels"],
                                     pool_scales=cfg["pool_scales"], **cfg["backbone"], **kw)


@pytest.fixture(scope="module")
def official(upernet_cfg):
    assert overlock.create_segmentation_model is create_segmentation_model
    return _tiny(upernet_cfg, str(DATA / "upernet.pth")).eval()


@pytest.mark.parametrize("i", [0, 1])
def test_matches_mmsegmentation(official, upernet_expected, i):
    x = upernet_expected[f"input_{i}"]
    with torch.no_grad():
        decode, aux = official.forward_train(x)
        logits = official(x)
    assert logits.shape == upernet_expected[f"logits_{i}"].shape == (x.shape[0], 5, *x.shape[-2:])
    assert rel_err(decode, upernet_expected[f"decode_{i}"]) < 1e-4
    assert rel_err(logits, upernet_expected[f"logits_{i}"]) < 1e-4
    assert rel_err(aux, upernet_expected[f"aux_{i}"]) < 1e-4


@pytest.mark.parametrize("i", [0, 1])
def test_fused_model_gives_mmsegmentations_logits(official, upernet_expected, i):
    """``overlock.fuse`` (what ``overlock segment`` runs) keeps mmsegmentation's logits."""
    import overlock
    fused = overlock.fuse(official)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.backbone.modules())
    with torch.no_grad():
        logits = fused(upernet_expected[f"input_{i}"].contiguous(memory_format=torch.channels_last))
    assert rel_err(logits, upernet_expected[f"logits_{i}"]) < 1e-4


def test_checkpoint_metadata_and_eval_has_no_dropout(official):
    assert official.class_names == ["class0", "class1", "class2", "class3", "class4"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(official(x), official(x))


@pytest.mark.parametrize("variant", ["t", "s", "b"])
def test_full_size_layout_equals_official_files(variant):
    """Every key and shape of upernet_overlock_{t,s,b}_ade20k (built on the meta device: no memory, fast)."""
    with gzip.open(DATA / "segmentation_keys.json.gz", "rt") as f:
        ref = json.load(f)[f"upernet_overlock_{variant}_ade20k"]
    with torch.device("meta"):
        model = create_segmentation_model(f"overlock_{variant}")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(ref) - set(ours)) == [] and sorted(set(ours) - set(ref)) == []
    assert ours == ref
    assert len(model.class_names) == 150 and model.class_names[0] == "wall"


def test_strict_and_safe_loading(upernet_cfg, tmp_path):
    state = torch.load(DATA / "upernet.pth", weights_only=True)["state_dict"]
    broken = dict(state)
    broken.pop("decode_head.fpn_bottleneck.bn.running_var")
    broken["decode_head.extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save({"state_dict": broken}, path)
    with pytest.raises(CheckpointError, match="fpn_bottleneck.bn.running_var") as e:
        _tiny(upernet_cfg, str(path))
    assert "decode_head.extra.weight" in str(e.value) and str(path) in str(e.value)
    with pytest.raises(CheckpointError, match="5 classes"):
        create_segmentation_model("test_overlock", num_classes=7, checkpoint=str(DATA / "upernet.pth"),
                                  channels=32, aux_channels=16, **upernet_cfg["backbone"])
    pickled = tmp_path / "pickled.pth"
    torch.save({"state_dict": state, "obj": types.SimpleNamespace(a=1)}, pickled)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        _tiny(upernet_cfg, str(pickled))


def test_starts_from_imagenet_checkpoint(upernet_cfg, expected):
    """Backbone from a classification file, dense-only layers and heads fresh (and named in a warning)."""
    with pytest.warns(UserWarning, match="initialised fresh: backbone.extra_norm, decode_head, auxiliary_head"):
        model = _tiny(upernet_cfg, str(DATA / "classification.pth"))
    cls = torch.load(DATA / "classification.pth", weights_only=True)["state_dict"]
    assert torch.equal(model.backbone.state_dict()["patch_embed1.0.weight"], cls["patch_embed1.0.weight"])
    out = model.eval()(expected["input_0"][:, :, :64, :64])
    assert out.shape[-2:] == (64, 64) and torch.isfinite(out).all()


def test_timm_dense_features_are_the_official_backbone(expected):
    feats = timm.create_model("dense_test_overlock", features_only=True, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(DATA / "segmentation.pth"))).eval()
    assert feats.feature_info.channels() == [16, 32, 88, 120]
    assert feats.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        outs = feats(expected["input_1"])
    for j, out in enumerate(outs):
        assert rel_err(out, expected[f"segmentation_1_level{j}"]) < 1e-4
    assert [f.shape[1] for f in timm.create_model("dense_test_overlock", out_indices=(1, 3))(
        torch.randn(1, 3, 64, 64))] == [32, 120]
    with pytest.raises(ValueError, match="in_chans"):
        timm.create_model("dense_test_overlock", in_chans=1)


def test_segmentation_models_pytorch_host():
    smp = pytest.importorskip("segmentation_models_pytorch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = smp.UPerNet(encoder_name="tu-dense_test_overlock", encoder_weights=None, classes=4)
    assert model.encoder.out_channels[2:] == [16, 32, 88, 120]
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 4, 64, 64)


def test_transformers_uperhead_computes_the_same_eval_function(official, upernet_expected, upernet_cfg):
    """Why we keep our own head: transformers' UperNetHead matches in eval (shown here) but has no dropout
    before the classifier, which the official recipe trains with."""
    upernet = pytest.importorskip("transformers.models.upernet.modeling_upernet")
    config = types.SimpleNamespace(pool_scales=upernet_cfg["pool_scales"], hidden_size=32, num_labels=5)
    head = upernet.UperNetHead(config, in_channels=upernet_cfg["backbone_out_channels"])
    state = {k.replace(".bn.", ".batch_norm.").replace("conv_seg.", "classifier."): v
             for k, v in official.decode_head.state_dict().items()}
    head.load_state_dict(state)
    x = upernet_expected["input_0"]
    with torch.no_grad():
        out = head.eval()(official.backbone(x))
    assert rel_err(out, upernet_expected["decode_0"]) < 1e-4
    assert not any(isinstance(m, torch.nn.Dropout2d) for m in head.modules())
