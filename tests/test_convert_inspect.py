"""``overlock convert`` and ``overlock inspect`` on files in the official layouts (made by the official code)."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import timm
from safetensors import safe_open
from safetensors.torch import load_file

import overlock
from overlock.convert import convert_checkpoint
from overlock.inspection import inspect_checkpoint, inspect_state
from overlock.models.factory import TEST_CONFIG
from overlock.weights import CheckpointError

from cli_helpers import run_cli

DATA = Path(__file__).parent / "data"
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def expected():
    return {k: torch.from_numpy(v) for k, v in np.load(DATA / "expected.npz").items()}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiny(deploy=False, **kw):
    return overlock.OverLoCK(num_classes=10, deploy=deploy, **TEST_CONFIG, **kw).eval()


def test_inspect_tiny_official_files():
    info = inspect_checkpoint(DATA / "classification.pth")
    assert (info.task, info.variant, info.form, info.num_classes, info.has_aux_head, info.has_ema, info.wrapper) == \
        ("classification", "test_overlock", "training", 10, True, False, "state_dict")
    assert info.exact and info.container == "pytorch-zip"
    model = tiny(use_ds=True)
    assert info.num_params == sum(p.numel() for p in model.parameters())
    info = inspect_checkpoint(DATA / "classification_reparam.pth")
    assert (info.form, info.exact) == ("deploy", True)
    info = inspect_checkpoint(DATA / "upernet.pth")
    assert (info.task, info.num_classes, info.class_names, info.head_keys, info.head_missing) == \
        ("segmentation", 5, [f"class{i}" for i in range(5)], 82, [])
    info = inspect_checkpoint(DATA / "maskrcnn.pth")
    assert (info.task, info.num_classes, info.class_names, info.head_keys, info.head_missing) == \
        ("detection", 3, ["a", "b", "c"], 42, [])
    info = inspect_checkpoint(DATA / "segmentation.pth")  # backbone plus one stray neck key
    assert info.exact and info.other_keys == ["neck.lateral_convs.0.conv.weight"]
    code, out, err = run_cli("inspect", DATA / "maskrcnn.pth", DATA / "classification_reparam.pth", "--json")
    assert code == 0, err
    found = json.loads(out)
    assert [(f["task"], f["variant"], f["form"], f["num_classes"], f["exact"]) for f in found] == \
        [("detection", "test_overlock", "training", 3, True), ("classification", "test_overlock", "deploy", 10, True)]


def _meta_state(keys):
    return {k: torch.empty(tuple(s), device="meta") for k, s in keys.items()}


def test_inspect_recognises_every_official_release_layout():
    """Key/shape lists of the real official files (all variants, forms and dense tasks), without the files."""
    forms = {}
    with gzip.open(DATA / "checkpoint_keys.tsv.gz", "rt") as f:
        next(f)
        for line in f:
            form, key, shape = line.rstrip("\n").split("\t")
            forms.setdefault(form, {})[key] = () if shape == "scalar" else tuple(map(int, shape.split("x")))
    for form in ("overlock_t", "overlock_t_reparam", "overlock_b", "detection/overlock_s", "segmentation/overlock_t"):
        found = inspect_state(_meta_state(forms[form]), form)
        task = form.split("/")[0] if "/" in form else "classification"
        variant = form.split("/")[-1].replace("_reparam", "")
        assert (found["task"], found["variant"], found["form"]) == \
            (task, variant, "deploy" if form.endswith("_reparam") else "training")
        assert not (found["missing"] or found["unexpected"] or found["mismatched"])
        assert found["num_classes"] == (1000 if task == "classification" else None)
    for name, form, task, variant, classes in (
            ("segmentation_keys.json.gz", "upernet_overlock_s_ade20k", "segmentation", "overlock_s", 150),
            ("detection_keys.json.gz", "mask_rcnn_overlock_t_in1k_fpn_coco", "detection", "overlock_t", 80)):
        keys = json.load(gzip.open(DATA / name))[form]
        found = inspect_state(_meta_state(keys), form)
        assert (found["task"], found["variant"], found["num_classes"]) == (task, variant, classes)
        assert not (found["missing"] or found["unexpected"] or found["mismatched"] or found["head_missing"])


def test_convert_to_safetensors_loads_with_timm_and_gives_the_official_outputs(tmp_path, expected):
    dst = tmp_path / "tiny.safetensors"
    result = convert_checkpoint(DATA / "classification.pth", dst)
    meta = result.metadata
    assert meta["source_sha256"] == hashlib.sha256((DATA / "classification.pth").read_bytes()).hexdigest()
    assert (meta["variant"], meta["task"], meta["form"], meta["num_classes"], meta["ema"]) == \
        ("test_overlock", "classification", "training", "10", "false")
    with safe_open(str(dst), "pt") as f:
        assert f.metadata() == meta
    model = timm.create_model("test_overlock", pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(dst), num_classes=10)).eval()
    with torch.no_grad():
        for i in (0, 1):
            assert rel_err(model(expected[f"input_{i}"]), expected[f"logits_{i}"]) < 1e-4


def test_convert_reparam_without_aux_equals_the_official_deploy_file(tmp_path, expected):
    dst = tmp_path / "deploy.safetensors"
    code, out, err = run_cli("convert", DATA / "classification.pth", dst, "--reparam", "--no-aux")
    assert code == 0, err
    assert "deploy form" in out and "left out 7 tensors" in out and "verified: deploy form vs training form" in out
    mine = load_file(str(dst))
    official = torch.load(DATA / "classification_reparam.pth", weights_only=True)["state_dict"]
    assert set(mine) == {k for k in official if not k.startswith("aux_head.")}
    for k, v in mine.items():
        torch.testing.assert_close(v, official[k], rtol=1e-5, atol=1e-6, msg=k)
    model = tiny(deploy=True)
    overlock.load_into(model, dst)
    with torch.no_grad():
        for i in (0, 1):
            assert rel_err(model(expected[f"input_{i}"]), expected[f"logits_reparam_{i}"]) < 1e-4
    code, out, _ = run_cli("inspect", dst)
    assert code == 0 and "form:        deploy" in out and "aux head:    no" in out and "all match" in out


def test_convert_chooses_ema_or_not_and_reads_run_checkpoints(tmp_path):
    sd = torch.load(DATA / "classification.pth", weights_only=True)["state_dict"]
    ema_sd = {k: v * 2 if v.is_floating_point() else v for k, v in sd.items()}
    src = tmp_path / "with_ema.pth"
    # the layout of timm's / the official train.py checkpoints: argparse.Namespace under 'args'
    import argparse
    torch.save({"state_dict": sd, "state_dict_ema": ema_sd, "epoch": 3, "arch": "overlock_xt", "version": 2,
                "optimizer": {"state": {}, "param_groups": []}, "args": argparse.Namespace(model="overlock_xt"),
                "metric": 80.0}, src)
    assert inspect_checkpoint(src).has_ema
    r = convert_checkpoint(src, tmp_path / "ema.safetensors")
    assert r.metadata["ema"] == "true" and r.metadata["source_weights"] == "state_dict_ema"
    assert torch.equal(load_file(str(tmp_path / "ema.safetensors"))["head.4.weight"], ema_sd["head.4.weight"])
    code, _, err = run_cli("convert", src, tmp_path / "raw.safetensors", "--no-ema")
    assert code == 0, err
    assert torch.equal(load_file(str(tmp_path / "raw.safetensors"))["head.4.weight"], sd["head.4.weight"])
    code, _, err = run_cli("convert", DATA / "classification.pth", tmp_path / "x.safetensors", "--ema")
    assert code == 2 and "no EMA weights" in err
    # an overlock run checkpoint (train --output RUN/last.pth): model weights and class names
    run = {"format": "overlock-run-v1", "model": sd, "model_ema": None, "epoch": 1,
           "class_names": [f"c{i}" for i in range(10)]}
    torch.save(run, tmp_path / "last.pth")
    r = convert_checkpoint(tmp_path / "last.pth", tmp_path / "run.pth")
    back = torch.load(tmp_path / "run.pth", weights_only=True)
    assert back["meta"]["CLASSES"] == run["class_names"] and json.loads(r.metadata["class_names"]) == run["class_names"]
    assert all(torch.equal(back["state_dict"][k], v) for k, v in sd.items())
    assert inspect_checkpoint(tmp_path / "run.pth").class_names == run["class_names"]


def test_convert_dense_checkpoints_both_ways(tmp_path, expected):
    dst = tmp_path / "upernet.safetensors"
    r = convert_checkpoint(DATA / "upernet.pth", dst, reparam=True, drop_aux=True)
    assert r.metadata["form"] == "deploy" and r.metadata["class_names"] == json.dumps([f"class{i}" for i in range(5)])
    assert r.dropped and all(k.startswith("auxiliary_head.") for k in r.dropped)
    deploy = overlock.create_dense_backbone("overlock_t", "segmentation", dst, deploy=True, **TEST_CONFIG).eval()
    train = overlock.create_dense_backbone("overlock_t", "segmentation", DATA / "upernet.pth", **TEST_CONFIG).eval()
    with torch.no_grad():
        for a, b in zip(deploy(expected["input_0"]), train(expected["input_0"])):
            assert rel_err(a, b) < 1e-5
    # the reference backbone (official outputs), with its stray neck key carried along
    r = convert_checkpoint(DATA / "segmentation.pth", tmp_path / "seg.safetensors", reparam=True)
    assert "neck.lateral_convs.0.conv.weight" in load_file(str(tmp_path / "seg.safetensors"))
    backbone = overlock.create_dense_backbone("overlock_t", "segmentation", tmp_path / "seg.safetensors",
                                              deploy=True, **TEST_CONFIG).eval()
    with torch.no_grad():
        for j, level in enumerate(backbone(expected["input_1"])):
            assert rel_err(level, expected[f"segmentation_1_level{j}"]) < 1e-4
    original = torch.load(DATA / "maskrcnn.pth", weights_only=True)["state_dict"]
    convert_checkpoint(DATA / "maskrcnn.pth", tmp_path / "maskrcnn.safetensors")
    convert_checkpoint(tmp_path / "maskrcnn.safetensors", tmp_path / "back.pth")
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert set(back["state_dict"]) == set(original) and back["meta"]["CLASSES"] == ["a", "b", "c"]
    assert all(torch.equal(back["state_dict"][k], v) for k, v in original.items())
    assert back["meta"]["origin_sha256"] == hashlib.sha256((DATA / "maskrcnn.pth").read_bytes()).hexdigest()


def test_truncated_and_corrupted_files_name_the_bytes(tmp_path):
    raw = (DATA / "classification.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(raw[: len(raw) // 2])
    code, _, err = run_cli("inspect", tmp_path / "cut.pth")
    assert code == 2 and f"{len(raw) // 2} bytes" in err and "end-of-central-directory" in err
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF  # inside some tensor's data
    (tmp_path / "flip.pth").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="CRC-32"):
        inspect_checkpoint(tmp_path / "flip.pth")
    convert_checkpoint(DATA / "classification.pth", tmp_path / "ok.safetensors")
    st = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(st[:-1000])
    code, _, err = run_cli("convert", tmp_path / "cut.safetensors", tmp_path / "out.pth")
    assert code == 2 and f"the file has {len(st) - 1000} bytes (1000 missing)" in err
    assert not (tmp_path / "out.pth").exists()
    import pathlib
    torch.save({"state_dict": {}, "path": pathlib.PurePosixPath("x")}, tmp_path / "object.pth")
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        inspect_checkpoint(tmp_path / "object.pth")
    (tmp_path / "text.pth").write_text("hello, not a checkpoint")
    with pytest.raises(CheckpointError, match="first bytes b'hello, n'"):
        inspect_checkpoint(tmp_path / "text.pth")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        inspect_checkpoint(tmp_path / "empty.safetensors")


def test_foreign_and_incomplete_checkpoints_name_the_keys(tmp_path):
    resnet = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    torch.save({"model": resnet.state_dict()}, tmp_path / "foreign.pth")
    code, _, err = run_cli("convert", tmp_path / "foreign.pth", tmp_path / "x.safetensors")
    assert code == 2 and "not an OverLoCK classification checkpoint" in err and "0.weight" in err
    assert not (tmp_path / "x.safetensors").exists()
    sd = torch.load(DATA / "classification.pth", weights_only=True)["state_dict"]
    missing = next(k for k in sd if k.startswith("sub_blocks3.0."))
    sd.pop(missing)
    sd["blocks1.0.extra.weight"] = torch.zeros(3)
    sd["head.1.weight"] = torch.zeros(7)
    torch.save(sd, tmp_path / "broken.pth")
    code, out, _ = run_cli("inspect", tmp_path / "broken.pth", "--strict")
    assert code == 1 and missing in out and "blocks1.0.extra.weight" in out and "head.1.weight: file (7,)" in out
    with pytest.raises(CheckpointError) as e:
        convert_checkpoint(tmp_path / "broken.pth", tmp_path / "y.safetensors")
    assert missing in str(e.value) and "blocks1.0.extra.weight" in str(e.value)


def test_every_official_release_file_is_named_and_offline_says_what_to_do(tmp_path, monkeypatch):
    from overlock.models import factory
    files = factory.release_files()
    base = "https://github.com/LMMMEng/OverLoCK/releases/download/v1/"
    for size, v in (("tiny", "t"), ("small", "s"), ("base", "b")):
        for sched in ("1x", "3x"):
            name = f"maskrcnn{sched}_overlock_{size}_coco.pth"
            assert files[name] == base + name
        assert f"upernet_overlock_{size}_ade20k.pth" in files
        assert factory.dense_release(f"overlock_{v}", "segmentation") == f"upernet_overlock_{size}_ade20k.pth"
    for v in ("xt", "t", "s", "b"):
        assert f"overlock_{v}_in1k_224.pth" in files and f"overlock_{v}_in1k_224_reparam.pth" in files
    assert len(files) == 17
    assert factory.dense_release("overlock_s", "detection", "3x") == "maskrcnn3x_overlock_small_coco.pth"

    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(factory.ReleaseUnavailable) as e:
        factory.download_release("maskrcnn3x_overlock_base_coco.pth", cache_dir=str(tmp_path))
    msg = str(e.value)
    assert f"{base}maskrcnn3x_overlock_base_coco.pth" in msg
    assert str(tmp_path / "maskrcnn3x_overlock_base_coco.pth") in msg
    assert "create_dense_backbone('overlock_b', kind='detection', checkpoint=" in msg
    import timm.models._hub
    monkeypatch.setattr(timm.models._hub, "get_cache_dir", lambda *a, **k: str(tmp_path))
    code, _, err = run_cli("inspect", "overlock_t_in1k_224_reparam.pth")  # a release name, not a local file
    assert code == 2 and f"{base}overlock_t_in1k_224_reparam.pth" in err and "pretrained_cfg_overlay=dict(file=" in err
    # a file already in the cache directory is used as it is
    (tmp_path / "upernet_overlock_tiny_ade20k.pth").write_bytes((DATA / "upernet.pth").read_bytes())
    code, out, err = run_cli("inspect", "upernet_overlock_tiny_ade20k.pth")
    assert code == 0 and "task:        segmentation" in out, err


def test_reparam_conversion_refuses_a_deploy_form_that_computes_something_else(tmp_path, monkeypatch):
    import overlock.convert as conv
    good = conv.to_deploy_form

    def wrong(state, *args):
        out = good(state, *args)
        key = next(k for k in out if k.endswith("lk_origin.weight"))
        out[key] = out[key] * 1.5
        return out
    monkeypatch.setattr(conv, "to_deploy_form", wrong)
    with pytest.raises(CheckpointError, match="differs from its training form"):
        conv.convert_checkpoint(DATA / "classification.pth", tmp_path / "bad.safetensors", reparam=True)
    assert not (tmp_path / "bad.safetensors").exists()
