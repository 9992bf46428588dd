"""The official Mask R-CNN + OverLoCK against mmdetection 2.28's own outputs (tiny model), and the full-size
official checkpoint layouts."""
import gzip
import json

import numpy as np
import pytest
import torch
from torchvision.models.detection.image_list import ImageList

import overlock
from overlock.detection import create_detection_model
from overlock.detection.build import map_mmdet_keys
from overlock.weights import CheckpointError

from conftest import DATA, rel_err

TOL = 1e-4  # measured: FPN ~1e-6, boxes ~1e-6, scores ~4e-6
BOX_ATOL = 1e-2  # pixels, for matching detections by box (measured max 7e-4)


def tiny_kwargs():
    cfg = json.loads((DATA / "config.json").read_text())
    return dict(fpn_channels=32, representation_size=64, mask_channels=32,
                backbone_args={k: v for k, v in cfg.items() if k != "num_classes"})


@pytest.fixture(scope="module")
def model():
    return create_detection_model("overlock_t", checkpoint=DATA / "maskrcnn.pth", **tiny_kwargs())


@pytest.fixture(scope="module")
def ref():
    with np.load(DATA / "maskrcnn_expected.npz") as f:
        return {k: f[k] for k in f.files}


def case(ref, i):
    return torch.from_numpy(ref[f"input_{i}"]), tuple(int(v) for v in ref[f"img_shape_{i}"])


@pytest.fixture(scope="module")
def outputs(model, ref):
    """FPN levels, RPN proposals (boxes, scores) and final detections of each reference input, computed once."""
    out = {}
    with torch.no_grad():
        for i in (0, 1):
            x, hw = case(ref, i)
            feats = model.backbone(x)
            proposals = model.rpn.propose(ImageList(x, [hw]), feats)
            out[i] = (list(feats.values()), proposals, model.predict_preprocessed(x, [hw])[0])
    return out


def test_loads_official_layout_with_class_names(model):
    assert model.num_classes == 3 and model.class_names == ["a", "b", "c"]
    assert model.backbone.body.out_channels == [16, 32, 88, 120]


@pytest.mark.parametrize("i", [0, 1])
def test_fpn_levels(outputs, ref, i):
    feats = outputs[i][0]
    assert len(feats) == 5
    for j, f in enumerate(feats):
        assert f.shape == ref[f"fpn_{i}_level{j}"].shape
        assert rel_err(f, torch.from_numpy(ref[f"fpn_{i}_level{j}"])) < TOL


def match(ours, theirs, ours_labels=None, theirs_labels=None):
    """Index of our row matching each reference row by box, score (as a tie-breaker for repeated boxes) and
    label; the distance of each match."""
    dist = (ours[:, None, :4] - theirs[None, :, :4]).abs().amax(-1)
    if ours.shape[1] > 4:
        dist = dist + (ours[:, None, 4] - theirs[None, :, 4]).abs()
    if ours_labels is not None:
        dist = dist + 1e6 * (ours_labels[:, None] != theirs_labels[None, :])
    best, idx = dist.min(0)
    return idx, best


@pytest.mark.parametrize("i", [0, 1])
def test_rpn_proposals(outputs, ref, i):
    boxes, scores = outputs[i][1]
    expected = torch.from_numpy(ref[f"proposals_{i}"])
    assert boxes[0].shape[0] == expected.shape[0]  # same survivors of min-size filter and NMS
    ours = torch.cat([boxes[0], scores[0][:, None]], 1)
    idx, dist = match(ours, expected)
    back, back_dist = match(expected, ours)
    assert dist.max() < BOX_ATOL and back_dist.max() < BOX_ATOL  # same set (a few boxes occur twice)
    assert rel_err(boxes[0][idx], expected[:, :4]) < TOL
    assert rel_err(scores[0][idx], expected[:, 4]) < TOL


@pytest.mark.parametrize("i", [0, 1])
def test_detections_and_masks(outputs, ref, i):
    _, (h, w) = case(ref, i)
    out = outputs[i][2]
    expected = torch.from_numpy(ref[f"boxes_{i}"])
    labels = torch.from_numpy(ref[f"labels_{i}"])
    assert out["boxes"].shape == (len(expected), 4) and out["masks"].shape == (len(expected), h, w)
    ours = torch.cat([out["boxes"], out["scores"][:, None]], 1)
    idx, dist = match(ours, expected, out["labels"], labels)
    assert dist.max() < BOX_ATOL and len(set(idx.tolist())) == len(idx)  # same set of (box, label)
    assert rel_err(out["boxes"][idx], expected[:, :4]) < TOL
    assert rel_err(out["scores"][idx], expected[:, 4]) < TOL
    masks = torch.from_numpy(np.unpackbits(ref[f"masks_{i}"], axis=-1)[..., :w].astype(bool))
    disagree = (out["masks"][idx] != masks).float().mean().item()
    assert disagree < 1e-5  # measured ~2e-6: a few pixels at the 0.5 threshold
    assert masks.any(dim=(1, 2)).float().mean() > 0.5  # the reference masks are not trivially empty


def test_extract_features_and_batch_of_two(model, ref, outputs):
    """A batch gives each image the detections it gets alone at the same padded size (each clipped to its own
    size; the backbone's global context makes padding itself matter, as in mmdet)."""
    x0, hw0 = case(ref, 0)
    x1, hw1 = case(ref, 1)
    batch = torch.zeros(2, 3, 128, 160)
    batch[0] = x0[0]
    batch[1, :, :96, :96] = x1[0]
    out = model.predict_preprocessed(batch, [hw0, hw1])
    for i, o in enumerate(out):
        alone = outputs[0][2] if i == 0 else model.predict_preprocessed(batch[1:], [hw1])[0]
        idx, dist = match(torch.cat([o["boxes"], o["scores"][:, None]], 1),
                          torch.cat([alone["boxes"], alone["scores"][:, None]], 1), o["labels"], alone["labels"])
        assert dist.max() < 1e-3 and len(o["boxes"]) == len(alone["boxes"])
    assert len(model.extract_features(x1)) == 5


def test_full_model_call_equals_preprocess_then_test(model):
    """``model(images)`` = mmdet preprocessing + the test path, results in original pixels."""
    small = create_detection_model("overlock_t", checkpoint=DATA / "maskrcnn.pth", test_scale=(160, 128),
                                   **tiny_kwargs())
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8, generator=g)
    with torch.no_grad():
        out = small([img])[0]
        batch, _ = small.transform([img])
    assert batch.image_sizes == [(114, 160)] and batch.tensors.shape[-2:] == (128, 160)
    assert batch.tensors[..., 114:, :].abs().max() == 0  # zero padding to a multiple of 32
    mean = torch.tensor([123.675, 116.28, 103.53])[:, None, None]
    std = torch.tensor([58.395, 57.12, 57.375])[:, None, None]
    resized = torch.nn.functional.interpolate(img[None].float(), size=(114, 160), mode="bilinear").round()
    assert rel_err(batch.tensors[0, :, :114, :160], ((resized[0] - mean) / std)) < 1e-6
    ref_out = small.predict_preprocessed(batch.tensors, batch.image_sizes)[0]
    sf = batch.scale_factors[0]
    assert out["masks"].shape[1:] == (50, 70)
    idx, dist = match(out["boxes"] * sf, ref_out["boxes"], out["labels"], ref_out["labels"])
    assert len(out["boxes"]) == len(ref_out["boxes"]) > 0 and dist.max() < 1e-3
    # float uint8 inputs give the same result
    out_f = small([img.float() / 255])[0]
    assert torch.allclose(out_f["boxes"], out["boxes"], atol=1e-3)


def test_every_official_key_and_shape_is_consumed():
    layouts = json.loads(gzip.decompress((DATA / "detection_keys.json.gz").read_bytes()))
    assert len(layouts) == 3
    for form, keys in layouts.items():
        variant = "overlock_" + form.split("_")[3]
        with torch.device("meta"):
            model = create_detection_model(variant)
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        mapped = map_mmdet_keys(dict.fromkeys(keys, torch.empty(0)))
        theirs = {new: tuple(keys[old]) for new, old in zip(mapped, keys)}
        assert theirs == ours, form


def test_bad_checkpoints_are_clear_errors(tmp_path):
    state = torch.load(DATA / "maskrcnn.pth", weights_only=True)["state_dict"]
    bad = dict(state, **{"roi_head.extra.weight": torch.zeros(1)})
    torch.save({"state_dict": bad}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="roi_head.extra.weight"):
        create_detection_model("overlock_t", checkpoint=tmp_path / "bad.pth", **tiny_kwargs())
    missing = {k: v for k, v in state.items() if not k.startswith("rpn_head.rpn_cls")}
    torch.save({"state_dict": missing}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="rpn.head.cls_logits"):
        create_detection_model("overlock_t", checkpoint=tmp_path / "missing.pth", **tiny_kwargs())


def test_other_class_count_and_backbone_checkpoints(tmp_path):
    with pytest.warns(UserWarning, match="fresh class-specific"):
        m = create_detection_model("overlock_t", num_classes=5, checkpoint=DATA / "maskrcnn.pth", **tiny_kwargs())
    assert m.roi_heads.box_predictor.fc_cls.out_features == 6
    with pytest.warns(UserWarning, match="FPN, RPN and RoI heads start fresh"):
        m = create_detection_model("overlock_t", num_classes=2, checkpoint=DATA / "classification.pth",
                                   **tiny_kwargs())
    assert m.num_classes == 2 and m.class_names == ["class_0", "class_1"]


def test_public_api():
    assert overlock.create_detection_model is not None


def test_batched_nms_split_path_keeps_the_same_boxes():
    """mmcv's two batched-NMS forms (coordinate offsets below 10,000 boxes, per-group above) agree."""
    from overlock.detection.mmdet_ops import batched_nms
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(600, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 5 + torch.rand(600, 2, generator=g) * 30], 1)
    scores = torch.rand(600, generator=g)
    groups = torch.randint(0, 4, (600,), generator=g)
    small = batched_nms(boxes, scores, groups, 0.5)
    split = batched_nms(boxes, scores, groups, 0.5, split_thr=10)
    assert torch.equal(small, split)  # both by decreasing score; distinct random scores: same order
    assert (scores[small][1:] <= scores[small][:-1]).all()
    for k in groups.unique():  # no two kept boxes of one group overlap above the threshold
        kept = boxes[small[groups[small] == k]]
        iou = torchvision_iou(kept, kept).fill_diagonal_(0)
        assert iou.max() <= 0.5 + 1e-6


def torchvision_iou(a, b):
    from torchvision.ops import box_iou
    return box_iou(a, b)


def test_training_transform_crop_policy_keeps_targets_consistent():
    from overlock.detection.transform import MMDetTransform
    t = MMDetTransform((200, 120), train_scales=[(200, 100), (200, 120)], crop_aug=True).train()
    g = torch.Generator().manual_seed(0)
    np.random.seed(0)
    for _ in range(6):
        img = torch.randint(0, 256, (3, 90, 160), dtype=torch.uint8, generator=g)
        masks = torch.zeros(2, 90, 160, dtype=torch.uint8)
        masks[0, 10:40, 20:60] = 1
        masks[1, 50:80, 100:150] = 1
        target = {"boxes": torch.tensor([[20.0, 10, 60, 40], [100, 50, 150, 80]]), "labels": torch.tensor([1, 2]),
                  "masks": masks}
        batch, (out,) = t([img], [target])
        h, w = batch.image_sizes[0]
        assert max(h, w) <= 200 and min(h, w) <= 120
        assert len(out["boxes"]) == len(out["labels"]) == len(out["masks"])
        assert out["masks"].shape[-2:] == (h, w)
        if len(out["boxes"]):
            assert (out["boxes"][:, 2:] > out["boxes"][:, :2]).all()
            assert (out["boxes"][:, 2] <= w + 1e-3).all() and (out["boxes"][:, 3] <= h + 1e-3).all()


def test_fused_model_gives_mmdetections_detections(model, ref):
    """``overlock.fuse`` (what ``overlock detect`` runs) keeps mmdetection's detections."""
    import overlock
    fused = overlock.fuse(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.backbone.modules())
    x, hw = case(ref, 0)
    with torch.no_grad():
        out = fused.predict_preprocessed(x, [hw])[0]
    expected = torch.from_numpy(ref["boxes_0"])
    ours = torch.cat([out["boxes"], out["scores"][:, None]], 1)
    idx, dist = match(ours, expected, out["labels"], torch.from_numpy(ref["labels_0"]))
    assert out["boxes"].shape == (len(expected), 4)
    assert dist.max() < BOX_ATOL and len(set(idx.tolist())) == len(idx)
    assert rel_err(out["scores"][idx], expected[:, 4]) < TOL
