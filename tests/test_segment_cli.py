"""``overlock segment`` and the test-time preprocessing / sliding-window inference behind it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import run_cli
from conftest import DATA
from overlock.segmentation.inference import MEAN, STD, preprocess, rescale_size, slide_logits
from overlock.segmentation.model import model_from_checkpoint


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster on a loaded 2-core machine
    yield
    torch.set_num_threads(n)


def test_official_test_resize():
    # ADE20K-like 640x480: fit in (2048, 512) -> 683x512, then up to multiples of 32 -> 704x512
    assert rescale_size(640, 480) == (683, 512)
    assert rescale_size(3000, 500) == (2048, 341)
    x = preprocess(np.zeros((480, 640, 3), np.uint8))
    assert x.shape == (1, 3, 512, 704)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([-m / s for m, s in zip(MEAN, STD)]))
    assert preprocess(np.zeros((50, 70, 3), np.uint8), scale=None).shape == (1, 3, 64, 96)


def test_slide_window_averages_overlapping_crops():
    conv = torch.nn.Conv2d(3, 4, 1)  # a pointwise model: every window gives the same logits where they overlap
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        out = slide_logits(conv, x, crop=(32, 32), stride=(21, 21))
        assert torch.allclose(out, conv(x), atol=1e-6)
        calls = []
        slide_logits(lambda t: calls.append(tuple(t.shape[-2:])) or conv(t), x, (32, 32), (21, 21))
    assert len(calls) == 3 * 4 and set(calls) == {(32, 32)}


def test_model_from_official_file_reads_variant_and_classes():
    model = model_from_checkpoint(str(DATA / "upernet.pth"))
    assert model.num_classes == 5 and model.class_names[0] == "class0"
    assert model.config["channels"] == 32 and model.config["aux_channels"] == 16


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(root / "a.png")
    (root / "sub").mkdir()
    Image.fromarray(rng.integers(0, 255, (90, 40, 3), dtype=np.uint8)).save(root / "sub" / "b.jpg")
    (root / "broken.png").write_bytes(b"not an image")
    return root


def test_segment_writes_masks_overlays_and_json(images, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("segment", images, "--checkpoint", DATA / "upernet.pth", "-o", out,
                                   "--scale", "128", "64", "--json")
    assert code == 0, stderr
    assert "broken.png" in stderr  # named and skipped
    results = json.loads(stdout)
    assert [r["image"].rsplit("/", 1)[-1] for r in results] == ["a.png", "b.jpg"]
    model = model_from_checkpoint(str(DATA / "upernet.pth")).eval()
    for r in results:
        mask = Image.open(r["mask"])
        assert mask.mode == "P" and mask.size == tuple(r["size"])  # original size
        indices = np.asarray(mask)
        assert abs(sum(r["classes"].values()) - 1) < 1e-5
        for name, frac in r["classes"].items():
            assert frac == pytest.approx((indices == model.class_names.index(name)).mean(), abs=1e-6)
        assert Image.open(r["overlay"]).mode == "RGB" and Image.open(r["overlay"]).size == tuple(r["size"])
    # the mask is the argmax of the model at the official preprocessing, resized back
    image = np.asarray(Image.open(images / "a.png").convert("RGB"))
    from overlock.segmentation.inference import infer
    with torch.no_grad():
        ref = infer(model, preprocess(image, (128, 64)), image.shape[:2]).argmax(1)[0].numpy()
    assert np.array_equal(np.asarray(Image.open(results[0]["mask"])), ref)


def test_segment_sliding_window_and_errors(images, tmp_path):
    code, stdout, stderr = run_cli("segment", images / "a.png", "--checkpoint", DATA / "upernet.pth", "-o", tmp_path,
                                   "--no-resize", "--mode", "slide", "--crop-size", "32", "32", "--stride", "24", "24")
    assert code == 0, stderr
    assert (tmp_path / "a_mask.png").exists() and "a_overlay.png" in stdout
    code, _, stderr = run_cli("segment", images / "a.png", "--checkpoint", DATA / "classification.pth", "-o", tmp_path)
    assert code == 2 and "not a segmentation checkpoint" in stderr
    code, _, stderr = run_cli("segment", tmp_path / "missing.png", "--checkpoint", DATA / "upernet.pth")
    assert code == 2 and "missing.png" in stderr
