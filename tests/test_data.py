"""Data pieces of the command line: resumable sharded sampling, the digits demo data, augmentation compat."""
from __future__ import annotations

import os

import pytest
from PIL import Image

from overlock.data import ResumableSampler, ShardSampler, check_image_folder


def test_resumable_sampler_shards_and_resumes():
    full = [list(ResumableSampler(50, 4, seed=3, rank=r, world_size=2)) for r in range(2)]
    idx = [i for shard in full for i, _ in shard]
    assert len(idx) == 2 * 6 * 4 and len(set(idx)) == len(idx)  # disjoint, whole batches, rest dropped
    seeds = [s for shard in full for _, s in shard]
    assert len(set(seeds)) == len(seeds)
    s = ResumableSampler(50, 4, seed=3, rank=1, world_size=2)
    s.set_epoch(0, start_batch=2)
    assert list(s) == full[1][8:]  # resuming at batch 2 yields exactly the rest of the epoch
    s.set_epoch(1)
    assert list(s) != full[1]  # a new order every epoch
    assert sorted(i for r in range(3) for i in ShardSampler(10, r, 3)) == list(range(10))


def test_sampler_refuses_batches_larger_than_the_data():
    with pytest.raises(ValueError, match="--batch-size"):
        ResumableSampler(10, 8, world_size=2)


def test_digits_demo_data(tmp_path):
    pytest.importorskip("sklearn")
    from overlock.data.digits import write_digits

    counts = write_digits(str(tmp_path))
    assert counts["train"] + counts["val"] == 1797 and 355 <= counts["val"] <= 365
    samples = check_image_folder(str(tmp_path), ("train", "val"))
    assert {t for _, t in samples["val"]} == set(range(10))
    img = Image.open(samples["train"][0][0])
    assert img.size == (8, 8) and img.mode == "L" and max(img.getdata()) > 200


def test_posterize_to_zero_bits_gives_black_instead_of_crashing():
    from timm.data import auto_augment

    import overlock.data.loaders  # noqa: F401 - installs the fix

    img = Image.new("RGB", (4, 4), (200, 100, 50))
    assert auto_augment.NAME_TO_OP["PosterizeIncreasing"](img, 0).getpixel((0, 0)) == (0, 0, 0)
    assert auto_augment.NAME_TO_OP["Posterize"](img, 2).getpixel((0, 0)) == (192, 64, 0)


def test_predict_names_imagenet_classes_offline():
    from overlock.commands.predict import class_names

    names = class_names(None, 1000)
    assert len(names) == 1000 and names[0].startswith("tench") and "goldfish" in names[1]
    assert class_names(["cat", "dog"], 2) == ["cat", "dog"]
    assert class_names(None, 3) == ["class_0", "class_1", "class_2"]


def test_validation_split_alias(tmp_path):
    from overlock.data.folder import resolve_split

    os.makedirs(tmp_path / "train")
    os.makedirs(tmp_path / "validation")
    assert resolve_split(str(tmp_path), "val") == "validation"
    assert resolve_split(str(tmp_path), "train") == "train"
    assert resolve_split(str(tmp_path), "test") == "test"
