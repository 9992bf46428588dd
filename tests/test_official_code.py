"""Importing the official implementation from a checkout (``overlock.official_code``), for side-by-side runs.

The official repository is not shipped with the project: the mechanics are tested on a stand-in checkout that
imports what the official ``models/overlock.py`` imports. With ``OVERLOCK_OFFICIAL_CODE=/path/to/OverLoCK`` set,
the last test compares our models with the official code itself at full size.
"""
import json
import os
import sys
import textwrap

import pytest
import timm
import torch

import overlock
from overlock.cli import main
from overlock.ops.neighborhood import na2d_av_naive
from overlock.official_code import build_official_model

STAND_IN = textwrap.dedent('''
    import torch
    from torch import nn
    from natten.functional import na2d_av
    from mmengine.runner import load_checkpoint
    from timm.models.registry import register_model

    print("constructor chatter that must not reach the user")

    class Tiny(nn.Module):
        def __init__(self, num_classes=1000, use_ds=True):
            super().__init__()
            self.head = nn.Linear(4, num_classes)
            self.aux = nn.Linear(4, num_classes)

        def forward(self, x):
            b = x.shape[0]
            v = x[:, :2].permute(0, 2, 3, 1).reshape(b, 1, x.shape[2], x.shape[3], 2)
            attn = torch.softmax(x[:, :1].new_ones(b, 1, x.shape[2], x.shape[3], 9), -1)
            feats = torch.cat([na2d_av(attn, v, kernel_size=3).mean((1, 2, 3)), x[:, :2].mean((2, 3))], 1)
            if self.training:
                return dict(main=self.head(feats), aux=self.aux(feats))
            return self.head(feats)

    @register_model
    def overlock_xt(pretrained=False, **kwargs):
        if pretrained:
            load_checkpoint(None, "url")
        return Tiny(**kwargs)
''')


@pytest.fixture
def checkout(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "overlock.py").write_text(STAND_IN)
    return str(tmp_path)


def test_official_module_imports_with_stand_ins(checkout, capsys):
    model = build_official_model(checkout, "overlock_xt", num_classes=3).eval()
    assert "chatter" not in capsys.readouterr().out
    x = torch.randn(2, 3, 9, 11)
    v = x[:, :2].permute(0, 2, 3, 1).reshape(2, 1, 9, 11, 2)
    attn = torch.full((2, 1, 9, 11, 9), 1 / 9)
    feats = torch.cat([na2d_av_naive(attn, v, 3).mean((1, 2, 3)), x[:, :2].mean((2, 3))], 1)
    torch.testing.assert_close(model(x), model.head(feats))  # the stand-in na2d_av follows NATTEN's border rule
    # our registrations and the real module table are untouched
    assert timm.models._registry._model_entrypoints["overlock_xt"].__module__.startswith("overlock.")
    assert "natten" not in sys.modules or hasattr(sys.modules["natten"], "__file__")
    with pytest.raises(RuntimeError, match="mmengine"):
        build_official_model(checkout, "overlock_xt", pretrained=True)


def test_official_code_errors_name_the_folder_and_model(tmp_path, checkout, capsys):
    with pytest.raises(FileNotFoundError, match="models/overlock.py.*LMMMEng/OverLoCK"):
        build_official_model(str(tmp_path / "nowhere"), "overlock_t")
    with pytest.raises(ValueError, match="'overlock_q' is not a model of the official code"):
        build_official_model(checkout, "overlock_q")
    assert main(["benchmark", "--model", "test_overlock", "--official-code", str(tmp_path / "nowhere")]) == 2
    assert "overlock benchmark: error: " in capsys.readouterr().err


@pytest.mark.slow
def test_benchmark_measures_the_official_code_beside_ours(checkout, tmp_path):
    out = tmp_path / "bench.json"
    assert main(["benchmark", "--model", "overlock_xt", "--official-code", checkout, "--mode", "train", "-b", "2",
                 "--img-size", "32", "--warmup", "1", "--repeats", "1", "--threads", "1", "--num-classes", "10",
                 "--json", str(out)]) == 0
    ours, official = json.loads(out.read_text())["results"]
    assert "error" not in official, official.get("error")
    assert official["official_code"] == checkout and "official code" in official["label"]
    assert not official["channels_last"] and ours["channels_last"]
    assert ours["speedup_vs_official_code"] == pytest.approx(ours["img_per_s"] / official["img_per_s"])


@pytest.mark.skipif(not os.environ.get("OVERLOCK_OFFICIAL_CODE"), reason="set OVERLOCK_OFFICIAL_CODE to a checkout "
                    "of github.com/LMMMEng/OverLoCK to compare with the official code itself")
@pytest.mark.parametrize("name", ["overlock_xt", "overlock_t", "overlock_s", "overlock_b"])
def test_full_size_models_equal_the_official_code(name):
    torch.manual_seed(0)
    official = build_official_model(os.environ["OVERLOCK_OFFICIAL_CODE"], name).eval()
    ours = timm.create_model(name, use_ds=True).eval()
    ours.load_state_dict(official.state_dict())
    x = torch.randn(1, 3, 96, 136)
    with torch.no_grad():
        ref, out = official(x), ours(x)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4
    with torch.no_grad():
        deploy = timm.utils.reparameterize_model(ours)(x.contiguous(memory_format=torch.channels_last))
    assert ((deploy - ref).norm() / ref.norm()).item() < 1e-4


@pytest.mark.skipif(not os.environ.get("OVERLOCK_OFFICIAL_CODE"), reason="set OVERLOCK_OFFICIAL_CODE to a checkout "
                    "of github.com/LMMMEng/OverLoCK to compare with the official code itself")
def test_training_gradients_equal_the_official_code():
    """One training-mode backward (BatchNorm batch statistics, aux head): every gradient as the official code's."""
    torch.manual_seed(0)
    official = build_official_model(os.environ["OVERLOCK_OFFICIAL_CODE"], "overlock_xt", use_ds=True).train()
    ours = timm.create_model("overlock_xt", use_ds=True).train()
    ours.load_state_dict(official.state_dict())
    ours = ours.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64)
    out = official(x)
    (out["main"].square().mean() + 0.4 * out["aux"].square().mean()).backward()
    logits, aux = ours(x.contiguous(memory_format=torch.channels_last), return_aux=True)
    (logits.square().mean() + 0.4 * aux.square().mean()).backward()
    want = {n: p.grad for n, p in official.named_parameters() if p.grad is not None}
    got = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert want.keys() == got.keys()
    scale = max(g.abs().max().item() for g in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-4 * scale, msg=name)


@pytest.mark.skipif(not os.environ.get("OVERLOCK_OFFICIAL_CODE"), reason="set OVERLOCK_OFFICIAL_CODE to a checkout "
                    "of github.com/LMMMEng/OverLoCK to compare with the official code itself")
def test_segmentation_backbone_equals_the_official_code():
    from overlock.official_code import build_official_segmentation_backbone
    from overlock.segmentation.model import create_segmentation_model
    torch.manual_seed(0)
    official = build_official_segmentation_backbone(os.environ["OVERLOCK_OFFICIAL_CODE"], "overlock_xt").eval()
    ours = create_segmentation_model("overlock_xt", 11, channels=16, aux_channels=8).backbone.eval()
    assert official.out_channels == list(ours.out_channels)
    ours.load_state_dict(official.state_dict())  # strict: the same keys and shapes
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        refs, outs = official(x), ours(x)
    assert len(refs) == len(outs) == 4
    for ref, out in zip(refs, outs):
        assert ((out - ref).norm() / ref.norm()).item() < 1e-5
