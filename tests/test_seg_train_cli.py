"""``overlock train-seg`` / ``eval-seg`` end to end on generated digit scenes (tiny model, CPU, a few iterations),
plus the mmseg-equivalent metrics, loss, schedule and the data rules they rely on."""
from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import run_cli

pytest.importorskip("sklearn")
pytest.importorskip("skimage")

FAST = ["--model", "test_overlock", "--channels", "16", "--aux-channels", "8", "--crop-size", "48", "48",
        "--scale", "48", "48", "-b", "4", "--iters", "6", "--eval-interval", "3", "--warmup-iters", "2", "--lr", "1e-3",
        "-j", "0"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster on a loaded 2-core machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from overlock.data.scenes import write_segmentation_dataset
    root = tmp_path_factory.mktemp("scenes")
    write_segmentation_dataset(str(root), n_train=16, n_val=4, size=48, seed=0)
    return root


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "a"
    code, _, stderr = run_cli("train-seg", "--data-dir", data, *FAST, "--output", out)
    assert code == 0, stderr
    return out


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_scene_generator_api():
    from overlock.data.scenes import make_scene, semantic_label
    image, instances = make_scene(np.random.default_rng(3), 64)
    again, _ = make_scene(np.random.default_rng(3), 64)
    assert image.dtype == np.uint8 and image.shape == (64, 64, 3) and np.array_equal(image, again)
    assert 1 <= len(instances) <= 3
    total = np.zeros((64, 64), int)
    for class_id, mask in instances:
        assert 0 <= class_id <= 9 and mask.dtype == bool and mask.shape == (64, 64) and mask.sum() >= 4
        total += mask
    assert total.max() == 1  # instances never overlap
    label = semantic_label(instances, 64)
    assert set(np.unique(label)) == {0} | {c + 1 for c, _ in instances}


def test_scene_generator_options(tmp_path):
    from overlock.data.scenes import main, make_scene
    rng = np.random.default_rng(0)
    counts = [len(make_scene(rng, 64, min_digits=2, max_digits=2, min_side=0.3, max_side=0.35)[1]) for _ in range(20)]
    assert max(counts) == 2 and min(counts) >= 1 and sum(counts) > 30  # two asked; fewer only when they do not fit
    sides = []
    for _ in range(20):
        for _c, mask in make_scene(rng, 64, max_digits=1, min_side=0.5, max_side=0.5)[1]:
            ys, xs = np.nonzero(mask)
            sides.append(max(ys.max() - ys.min(), xs.max() - xs.min()) + 1)
    assert 20 <= min(sides) and max(sides) <= 32  # glyphs fill most of their 32-pixel square
    for bad in (dict(min_digits=0), dict(min_digits=3, max_digits=2), dict(min_side=0.7, max_side=0.6)):
        with pytest.raises(ValueError, match="make_scene"):
            make_scene(rng, 64, **bad)
    assert main([str(tmp_path), "--train", "2", "--val", "1", "--size", "32", "--min-digits", "1", "--max-digits",
                 "1", "--min-side", "0.6", "--max-side", "0.8"]) == 0
    label = np.asarray(Image.open(tmp_path / "masks" / "train" / "scene_00000.png"))
    assert label.shape == (32, 32) and len(set(np.unique(label)) - {0}) == 1


def test_train_writes_run_and_learns(trained):
    files = set(os.listdir(trained))
    assert {"last.pth", "best.pth", "metrics.csv", "curves.png"} <= files
    state = torch.load(trained / "last.pth", weights_only=True)
    assert state["step"] == 6 and state["seg_model"]["model"] == "test_overlock"
    assert state["class_names"][:2] == ["background", "0"] and len(state["class_names"]) == 11
    rows = _rows(trained / "metrics.csv")
    assert [int(r["iteration"]) for r in rows] == [3, 6]
    assert all(math.isfinite(float(r["train_loss"])) and 0 <= float(r["mIoU"]) <= 100 for r in rows)
    assert float(rows[-1]["train_loss"]) < math.log(11)  # below the loss of uniform guessing over 11 classes
    assert float(rows[-1]["aAcc"]) > 50  # mostly background, which it must have learnt


def test_resume_after_interruption_is_exact(data, trained, tmp_path):
    out = tmp_path / "b"
    code, _, stderr = run_cli("train-seg", "--data-dir", data, *FAST, "--output", out, "--stop-after", "2")
    assert code == 0, stderr
    assert torch.load(out / "last.pth", weights_only=True)["step"] == 2
    code, _, stderr = run_cli("train-seg", "--data-dir", data, *FAST, "--resume", out / "last.pth")
    assert code == 0, stderr
    a = torch.load(trained / "last.pth", weights_only=True)["model"]
    b = torch.load(out / "last.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = _rows(trained / "metrics.csv"), _rows(out / "metrics.csv")
    assert [(r["iteration"], r["mIoU"], r["train_loss"]) for r in ra] == \
        [(r["iteration"], r["mIoU"], r["train_loss"]) for r in rb]


def test_eval_seg_reproduces_training_metrics(data, trained, tmp_path):
    best = torch.load(trained / "best.pth", weights_only=True)
    results = tmp_path / "eval.json"
    code, stdout, stderr = run_cli("eval-seg", "--data-dir", data, "--checkpoint", trained / "best.pth",
                                   "--scale", "48", "48", "-j", "0", "--results-file", results)
    assert code == 0, stderr
    r = json.loads(results.read_text())
    assert r["mIoU"] == pytest.approx(best["metric"]["mIoU"], abs=1e-9)
    assert r["aAcc"] == pytest.approx(best["metric"]["aAcc"], abs=1e-9)
    assert len(r["per_class"]) == 11 and r["images"] == 4 and "mIoU" in stdout
    code, stdout, stderr = run_cli("segment", data / "images" / "val", "--checkpoint", trained / "best.pth",
                                   "--scale", "48", "48", "-o", tmp_path / "masks", "--json")
    assert code == 0, stderr
    assert len(json.loads(stdout)) == 4 and "background" in stdout


def test_bad_masks_are_named_and_skipped(data, tmp_path):
    import shutil
    root = tmp_path / "broken"
    shutil.copytree(data, root)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "masks" / "val" / "scene_00000.png")  # wrong size
    (root / "masks" / "train" / "scene_00001.png").write_bytes(b"garbage")  # unreadable
    os.remove(root / "masks" / "train" / "scene_00002.png")  # missing
    Image.fromarray(np.full((48, 48), 77, np.uint8)).save(root / "masks" / "train" / "scene_00003.png")  # no class 77
    code, _, stderr = run_cli("train-seg", "--data-dir", root, *FAST, "--iters", "2", "--eval-interval", "2",
                              "--output", tmp_path / "run")
    assert code == 0, stderr
    assert "scene_00002.png" in stderr  # missing mask, listed when the split is read
    bad = (tmp_path / "run" / "bad_images.txt").read_text()
    assert "masks/val/scene_00000.png" in bad and "differs from its image" in bad
    assert "masks/train/scene_00001.png" in bad or "masks/train/scene_00003.png" in bad
    code, _, stderr = run_cli("train-seg", "--data-dir", tmp_path / "nowhere", *FAST)
    assert code == 2 and "nowhere" in stderr


def test_metrics_match_the_mmseg_definition():
    from overlock.segmentation.metrics import IoUAccumulator, summarize
    acc = IoUAccumulator(3)
    acc.update(torch.tensor([[0, 1], [1, 2]]), torch.tensor([[0, 1], [2, 255]]))
    acc.update(torch.tensor([[0, 0]]), torch.tensor([[0, 1]]))
    s = summarize(acc.totals, ["a", "b", "c"])
    # class a: inter 2, union 3; b: inter 1, union 3 (pred 2 + label 2 - 1); c: inter 0, union 1; 3 of 5 pixels right
    assert [c["IoU"] for c in s["per_class"]] == pytest.approx([200 / 3, 100 / 3, 0.0])
    assert s["mIoU"] == pytest.approx(100 / 3) and s["aAcc"] == pytest.approx(60.0)
    acc = IoUAccumulator(3)
    acc.update(torch.tensor([0, 0]), torch.tensor([0, 1]))
    s = summarize(acc.totals, ["a", "b", "c"])
    assert s["per_class"][2]["IoU"] is None and s["mIoU"] == pytest.approx(25.0)  # absent class: nanmean


def test_schedule_loss_and_param_groups():
    from overlock.segmentation.train import param_groups, poly_lr_factor, seg_loss
    assert poly_lr_factor(0, 160000, 1500, 1e-6) == pytest.approx(1e-6)
    assert poly_lr_factor(750, 160000, 1500, 1e-6) == pytest.approx((1 - 750 / 160000) * (0.5 + 0.5e-6))
    assert poly_lr_factor(80000, 160000, 1500, 1e-6) == pytest.approx(0.5)
    logits = torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 3, (2, 4, 4))
    labels[0, 0] = 255
    per_pixel = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    assert seg_loss(logits, labels).item() == pytest.approx(per_pixel.sum().item() / labels.numel())
    weight = torch.tensor([0.5, 2.0, 4.0])  # mmseg class_weight: each pixel times its class's weight, / all pixels
    valid = labels != 255
    weighted = (per_pixel[valid] * weight[labels[valid]]).sum() / labels.numel()
    assert seg_loss(logits, labels, class_weight=weight).item() == pytest.approx(weighted.item())
    from overlock.segmentation import create_segmentation_model
    model = create_segmentation_model("test_overlock", 3, channels=8, aux_channels=8)
    decay, no_decay = param_groups(model, 0.01, ["norm"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in names[id(p)] for p in no_decay["params"]) and no_decay["weight_decay"] == 0
    assert any(".rpb1" in names[id(p)] for p in decay["params"])  # the official keys miss OverLoCK's rpb names


def test_class_weight_count_is_checked_before_anything_is_written(data, tmp_path):
    out = tmp_path / "run"
    code, _, stderr = run_cli("train-seg", "--data-dir", data, *FAST, "--class-weight", "1", "5", "--output", out)
    assert code == 2 and "--class-weight: 2 weights for 11 classes" in stderr, stderr
    assert not out.exists()
