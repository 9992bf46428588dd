"""``overlock detect-train / detect-eval / detect`` end to end on tiny generated COCO-format data (CPU)."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")

from cli_helpers import run_cli  # noqa: E402
from overlock.detection.coco_writer import write_coco_split  # noqa: E402
from overlock.detection.data import CocoInstances  # noqa: E402

CLASSES = ["square", "disc"]
SIZE = 48


def scene(rng, size=SIZE):
    """Red squares and cyan discs on grey noise; later shapes occlude earlier ones."""
    img = rng.normal(110, 30, (size, size, 3)).clip(0, 255)
    yy, xx = np.mgrid[:size, :size]
    instances = []
    for _ in range(rng.integers(1, 3)):
        c, r = int(rng.integers(0, 2)), int(rng.integers(5, 10))
        cx, cy = rng.integers(r, size - r, 2)
        m = (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r) if c == 0 else (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        img[m] = (230, 60, 40) if c == 0 else (40, 200, 230)
        instances = [(k, mm & ~m) for k, mm in instances] + [(c, m)]
    return img.astype(np.uint8), instances


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    rng = np.random.default_rng(0)
    train = write_coco_split(str(root), "train", [scene(rng) for _ in range(4)], CLASSES)
    val = write_coco_split(str(root), "val", [scene(rng) for _ in range(2)], CLASSES)
    return root, train, val


FAST = ["--model", "test_overlock", "--fpn-channels", "16", "--box-fc", "32", "--mask-channels", "16",
        "--img-scale", str(SIZE), str(SIZE), "-b", "2", "--warmup-iters", "1", "-j", "0", "--lr", "1e-3",
        "--lr-steps", "1"]


def train_args(coco, out, epochs, val=True):
    _, (tr_ann, tr_img), (va_ann, va_img) = coco
    return ["detect-train", "--train-ann", tr_ann, "--train-images", tr_img, *FAST, "--epochs", str(epochs),
            "--output", out, *(["--val-ann", va_ann, "--val-images", va_img, "--val-freq", "2"] if val else [])]


@pytest.fixture(scope="module")
def run(coco, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    code, stdout, stderr = run_cli(*train_args(coco, out, 2))
    assert code == 0, stderr
    return out, stderr


@pytest.mark.slow
def test_train_writes_state_metrics_curves_and_ap(run):
    out, log = run
    assert {"last.pth", "best.pth", "metrics.csv", "curves.png", "steps.csv", "eval.json",
            "bad_annotations.txt"} <= set(os.listdir(out))
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 4 and state["class_names"] == CLASSES
    assert state["category_ids"] == [1, 2] and state["detection_config"]["fpn_channels"] == 16
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1"] and rows[0]["bbox_mAP"] == ""  # --val-freq 2
    assert float(rows[0]["lr"]) == pytest.approx(1e-3) and float(rows[1]["lr"]) == pytest.approx(1e-4)
    for key in ("train_loss", "loss_mask", "loss_objectness", "bbox_mAP", "segm_mAP"):
        assert rows[-1][key] != "", key
    metrics = json.loads((out / "eval.json").read_text())
    assert 0 <= metrics["bbox_mAP"] <= 1 and 0 <= metrics["segm_mAP"] <= 1
    assert "Average Precision" in log and "box AP" in log


@pytest.mark.slow
def test_resume_continues_exactly(run, coco, tmp_path):
    out, _ = run
    part = tmp_path / "part"
    assert run_cli(*train_args(coco, part, 1, val=False))[0] == 0
    code, _, stderr = run_cli(*train_args(coco, part, 2, val=False), "--resume", part / "last.pth")
    assert code == 0, stderr
    assert "resuming" in stderr
    a = torch.load(out / "last.pth", weights_only=True)["model"]
    b = torch.load(part / "last.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with open(part / "metrics.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["0", "1"]


@pytest.mark.slow
def test_eval_command_reproduces_training_ap(run, coco, tmp_path):
    out, _ = run
    _, _, (va_ann, va_img) = coco
    code, stdout, stderr = run_cli("detect-eval", "--checkpoint", out / "last.pth", "--ann", va_ann, "--images",
                                   va_img, "--json", tmp_path / "m.json")
    assert code == 0, stderr
    assert "box AP" in stdout
    ours = json.loads((tmp_path / "m.json").read_text())
    logged = json.loads((out / "eval.json").read_text())
    assert ours["bbox_mAP"] == pytest.approx(logged["bbox_mAP"]) and ours["segm_mAP"] == pytest.approx(
        logged["segm_mAP"])


@pytest.mark.slow
def test_detect_writes_pngs_and_coco_results(run, coco, tmp_path):
    out, _ = run
    _, _, (_, va_img) = coco
    dest = tmp_path / "det"
    code, stdout, stderr = run_cli("detect", va_img, "--checkpoint", out / "last.pth", "--output", dest,
                                   "--score-thr", "0.0")
    assert code == 0, stderr
    assert sorted(os.listdir(dest)) == ["000001.png", "000002.png", "results.json"]
    results = json.loads((dest / "results.json").read_text())
    assert results and {r["image_id"] for r in results} <= {1, 2}
    r = results[0]
    assert r["category_id"] in (1, 2) and len(r["bbox"]) == 4 and r["segmentation"]["size"] == [SIZE, SIZE]
    # --score-thr filters
    code, _, _ = run_cli("detect", os.path.join(va_img, "000001.png"), "--checkpoint", out / "last.pth",
                         "--output", tmp_path / "d2",
                         "--score-thr", "1.01", "--no-images")
    assert code == 0 and json.loads((tmp_path / "d2" / "results.json").read_text()) == []
    code, _, stderr = run_cli("detect", tmp_path / "nothing.png", "--checkpoint", out / "last.pth")
    assert code == 2 and "nothing.png" in stderr


def test_coco_category_ids_for_official_files():
    from overlock.detection import COCO_CLASSES
    from overlock.detection.results import category_ids_for
    ids = category_ids_for(COCO_CLASSES)
    assert len(ids) == 80 and ids[:12] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13] and ids[-1] == 90


def test_bad_annotations_are_named_not_fatal(coco, tmp_path):
    root, (tr_ann, tr_img), _ = coco
    data = json.loads(open(tr_ann).read())
    img = data["images"][0]
    data["images"].append({"id": 99, "file_name": "missing.png", "height": SIZE, "width": SIZE})
    data["images"].append({"id": 98, "file_name": data["images"][1]["file_name"], "height": SIZE, "width": SIZE})
    base = dict(image_id=img["id"], category_id=1, segmentation=[], iscrowd=0, area=20)
    data["annotations"] += [
        dict(base, id=1001, bbox=[SIZE + 5, 5, 10, 10]),  # outside the image
        dict(base, id=1002, bbox=[5, 5, 0.5, 10], area=0),  # zero area
        dict(base, id=1003, bbox=[5, 5, 10, 10], iscrowd=1),  # crowd
        dict(base, id=1004, bbox=[5, 5, 10, 10], segmentation=[[1, 2, 3]]),  # malformed polygon -> box mask
        dict(base, id=1005, bbox=[5, 5, 10, 10], category_id=7),  # unknown category
    ]
    ann = tmp_path / "bad.json"
    ann.write_text(json.dumps(data))
    ds = CocoInstances(str(ann), tr_img, train=True)
    kinds = set(ds.report)
    assert {"missing image file", "box outside the image", "zero-area or sub-pixel box",
            "crowd region (not a training target)", "annotation of an unknown category"} <= kinds
    assert any("missing.png" in p for p in ds.problems)
    assert 99 not in ds.ids and 98 not in ds.ids  # missing file; no objects (skipped for training)
    x, target = ds[ds.ids.index(img["id"])]
    assert target["boxes"].shape[0] == target["masks"].shape[0] == target["labels"].shape[0]
    assert (target["boxes"][:, 2] > target["boxes"][:, 0]).all()
    assert "missing or malformed segmentation (box used)" in ds.report
    assert CocoInstances(str(ann), tr_img, train=False).ids.count(98) == 1  # evaluation keeps empty images


def test_val_ann_without_images_is_a_usage_error(coco, tmp_path):
    _, (tr_ann, tr_img), (va_ann, _) = coco
    code, _, stderr = run_cli("detect-train", "--train-ann", tr_ann, "--train-images", tr_img, "--val-ann", va_ann,
                              *FAST, "--output", str(tmp_path / "r"))
    assert code == 2
    assert "--val-ann needs --val-images" in stderr
    assert not (tmp_path / "r").exists()
