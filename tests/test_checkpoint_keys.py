"""Every key and shape of every official checkpoint form, at full size (tests/data/checkpoint_keys.tsv.gz)."""
import gzip
from collections import defaultdict

import pytest
import timm
import torch

import overlock
from overlock import create_dense_backbone, load_into

from conftest import DATA


def official_forms():
    forms = defaultdict(dict)
    with gzip.open(DATA / "checkpoint_keys.tsv.gz", "rt") as f:
        next(f)
        for line in f:
            form, key, shape = line.rstrip("\n").split("\t")
            forms[form][key] = () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))
    return forms


FORMS = official_forms()


def build(form: str):
    with torch.device("meta"):
        if "/" in form:
            kind, name = form.split("/")
            return create_dense_backbone(name, kind=kind)
        # official classification files carry the aux head; fuse=False: the deploy form as released
        return timm.create_model(form, use_ds=True, **({"fuse": False} if form.endswith("_reparam") else {}))


def test_all_forms_present():
    expected = {f"overlock_{v}{s}" for v in ("xt", "t", "s", "b") for s in ("", "_reparam")}
    expected |= {f"{k}/overlock_{v}" for k in ("detection", "segmentation") for v in ("t", "s", "b")}
    assert set(FORMS) == expected


@pytest.mark.parametrize("form", sorted(FORMS))
def test_keys_and_shapes(form):
    ours = {k: tuple(v.shape) for k, v in build(form).state_dict().items()}
    official = FORMS[form]
    assert sorted(set(official) - set(ours)) == []
    assert sorted(set(ours) - set(official)) == []
    assert {k: s for k, s in ours.items() if official[k] != s} == {}


def _state_from_form(form):
    return {k: torch.zeros(s) if s else torch.tensor(0) for k, s in FORMS[form].items()}


@pytest.mark.slow
def test_full_size_strict_load_with_wrappers(tmp_path):
    """An official-shaped XT file, wrapped as releases are, loads through timm's pretrained path."""
    state = _state_from_form("overlock_xt")
    state["head.4.bias"] = torch.arange(1000, dtype=torch.float32)
    for wrapper in ("state_dict", "model", "state_dict_ema", None):
        path = tmp_path / f"xt_{wrapper}.pth"
        torch.save({wrapper: state} if wrapper else state, path)
        model = timm.create_model("overlock_xt", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        assert torch.equal(model.head[4].bias, state["head.4.bias"])
        assert not model.has_aux_head  # official aux weights dropped: the default model has no aux head
    with_aux = timm.create_model("overlock_xt", pretrained=True, use_ds=True,
                                 pretrained_cfg_overlay=dict(file=str(path)))
    assert with_aux.has_aux_head


@pytest.mark.slow
def test_full_size_detection_checkpoint_in_mmdet_layout():
    state = {f"backbone.{k}": v for k, v in _state_from_form("detection/overlock_t").items()}
    state["backbone.extra_norm.4.bias"] = torch.full((512,), 3.0)
    state["neck.fpn_convs.0.conv.weight"] = torch.zeros(256, 256, 3, 3)
    model = create_dense_backbone("overlock_t", kind="detection", checkpoint={"meta": {}, "state_dict": state})
    assert torch.equal(model.extra_norm[4].bias, state["backbone.extra_norm.4.bias"])
    assert model.out_channels == [64, 128, 384, 640]


@pytest.mark.slow
def test_reparam_file_loads_into_reparam_model(tmp_path):
    path = tmp_path / "t_reparam.pth"
    torch.save({"state_dict": _state_from_form("overlock_xt_reparam")}, path)
    model = timm.create_model("overlock_xt_reparam", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert model.deploy
    with pytest.raises(overlock.CheckpointError, match="deploy-form"):
        load_into(timm.create_model("overlock_xt"), path)
