"""The tiny official model (weights, inputs, outputs produced by the official code) in every form and backend."""
import json

import pytest
import timm
import torch

import overlock
from overlock import ContMixBlock, OverLoCK, create_dense_backbone, load_into

from conftest import DATA, rel_err

TOL = 1e-5  # measured ~3e-7; the bound is 1e-4
BACKENDS = ["tiled", "unfold", "naive"]
INPUTS = [0, 1]  # 1 is 64x64: late maps smaller than the kernels


def classifier(cfg, path, **kwargs):
    model = OverLoCK(**cfg, **kwargs).eval()
    load_into(model, DATA / path)
    return model


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_classification_logits(tiny_config, expected, backend, memory_format):
    model = classifier(tiny_config, "classification.pth").to(memory_format=memory_format)
    with overlock.use_backend(backend), torch.no_grad():
        for i in INPUTS:
            x = expected[f"input_{i}"].contiguous(memory_format=memory_format)
            assert rel_err(model(x), expected[f"logits_{i}"]) < TOL


@pytest.mark.parametrize("backend", ["tiled", "unfold"])
def test_deploy_checkpoint_logits(tiny_config, expected, backend):
    model = classifier(tiny_config, "classification_reparam.pth", deploy=True)
    with overlock.use_backend(backend), torch.no_grad():
        for i in INPUTS:
            assert rel_err(model(expected[f"input_{i}"]), expected[f"logits_reparam_{i}"]) < TOL


def test_merged_branches_match_official_deploy_form(tiny_config, expected):
    """A training-form file loaded into the deploy form merges the dilated branches exactly as the official code."""
    model = classifier(tiny_config, "classification.pth", use_ds=True, deploy=True)
    official = torch.load(DATA / "classification_reparam.pth", weights_only=True)["state_dict"]
    ours = model.state_dict()
    assert sorted(ours) == sorted(official)
    assert all(ours[k].shape == official[k].shape for k in ours)
    for k in ours:
        if k.endswith("lk_origin.weight") or k.endswith("lk_origin.bias"):
            assert torch.allclose(ours[k], official[k], atol=1e-6, rtol=1e-5), k
    with torch.no_grad():
        for i in INPUTS:
            assert rel_err(model(expected[f"input_{i}"]), expected[f"logits_reparam_{i}"]) < TOL


def test_training_form_checkpoint_loads_into_deploy_model(tiny_config, expected):
    model = classifier(tiny_config, "classification.pth", deploy=True)
    with torch.no_grad():
        assert rel_err(model(expected["input_0"]), expected["logits_reparam_0"]) < TOL


def test_deploy_checkpoint_into_training_model_is_a_clear_error(tiny_config):
    with pytest.raises(overlock.CheckpointError, match="deploy-form"):
        classifier(tiny_config, "classification_reparam.pth")


@pytest.mark.parametrize("kind", ["detection", "segmentation"])
@pytest.mark.parametrize("backend", ["tiled", "unfold"])
def test_dense_backbones(tiny_config, expected, kind, backend):
    model = create_dense_backbone("overlock_t", kind=kind, checkpoint=DATA / f"{kind}.pth", **tiny_config).eval()
    assert model.out_channels == [16, 32, 64 + 24, 96 + 24]
    with overlock.use_backend(backend), torch.no_grad():
        for i in INPUTS:
            outs = model(expected[f"input_{i}"])
            assert [o.shape[1] for o in outs] == model.out_channels
            for j, out in enumerate(outs):
                assert rel_err(out, expected[f"{kind}_{i}_level{j}"]) < TOL, (kind, i, j)


def test_dense_backbone_deploy_form(tiny_config, expected):
    model = create_dense_backbone("overlock_t_reparam", kind="detection", checkpoint=DATA / "detection.pth",
                                  **tiny_config).eval()
    assert not any("dil_conv" in k for k in model.state_dict())
    with torch.no_grad():
        outs = model(expected["input_0"])
    for j, out in enumerate(outs):
        assert rel_err(out, expected[f"detection_0_level{j}"]) < TOL


def test_dense_backbone_from_classification_checkpoint(tiny_config, expected):
    with pytest.warns(UserWarning, match=r"extra_norm.*h_proj|h_proj.*extra_norm"):
        model = create_dense_backbone("overlock_t", kind="detection", checkpoint=DATA / "classification.pth",
                                      **tiny_config).eval()
    # stage 1 is shared with the classifier and only passes through a fresh LayerNorm (weight 1, bias 0)
    with torch.no_grad():
        s1 = model(expected["input_0"])[0]
        ref = classifier(tiny_config, "classification.pth").forward_pre(expected["input_0"])[0]
    assert rel_err(s1, torch.nn.functional.layer_norm(ref.permute(0, 2, 3, 1), (16,), eps=1e-6)
                   .permute(0, 3, 1, 2)) < TOL


def test_dense_checkpoint_mismatch_names_keys(tiny_config):
    # a segmentation checkpoint lacks the detection-only h_proj / extra_norm.4
    with pytest.raises(overlock.CheckpointError, match="h_proj"):
        create_dense_backbone("overlock_t", kind="detection", checkpoint=DATA / "segmentation.pth", **tiny_config)


@pytest.mark.parametrize("backend", BACKENDS)
def test_contmix_block(expected, backend):
    cfg = json.loads((DATA / "contmix_config.json").read_text())
    block = ContMixBlock(**cfg).eval()
    block.load_state_dict(torch.load(DATA / "contmix_block.pth", weights_only=True)["state_dict"])
    with overlock.use_backend(backend), torch.no_grad():
        for i in INPUTS:  # input 1 (9x11) is smaller than the 13x13 kernel
            assert rel_err(block(expected[f"contmix_input_{i}"]), expected[f"contmix_output_{i}"]) < TOL
        block.reparm()
        assert not any("dil_conv" in k for k in block.state_dict())
        for i in INPUTS:
            assert rel_err(block(expected[f"contmix_input_{i}"]), expected[f"contmix_output_{i}"]) < TOL


def test_timm_create_model_with_official_file(tiny_config, expected, tmp_path):
    """The same path a user takes with a released file: create_model(pretrained=True, file=...)."""
    model = timm.create_model("overlock_t", pretrained=True, **tiny_config,
                              pretrained_cfg_overlay=dict(file=str(DATA / "classification.pth"), num_classes=10))
    with torch.no_grad():
        assert rel_err(model.eval()(expected["input_1"]), expected["logits_1"]) < TOL
