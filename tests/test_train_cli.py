"""End-to-end tests of ``overlock train / validate / predict`` on small synthetic ImageFolders (CPU)."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from cli_helpers import FAST, kill_when, make_image_folder, run_cli, run_subprocess, start_subprocess
from overlock.training.optim import fused_kwargs


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("colours"))


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """One 3-epoch run with EMA, shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("run") / "r"
    code, stdout, stderr = run_cli("train", "--data-dir", data, *FAST, "--epochs", "4", "--model-ema",
                                   "--model-ema-decay", "0.9", "--mixup", "0", "--cutmix", "0", "--output", out)
    assert code == 0, stderr
    return out


@pytest.mark.slow
def test_train_writes_full_state_metrics_and_curves(trained):
    files = set(os.listdir(trained))
    assert {"last.pth", "best.pth", "best_ema.pth", "metrics.csv", "curves.png", "steps.csv"} <= files
    assert not [f for f in files if f.startswith(".tmp")]  # atomic writes leave no temporaries
    state = torch.load(trained / "last.pth", weights_only=True)  # loadable without unpickling objects
    assert state["epoch"] == 4 and state["batch"] == 0
    assert state["step"] == 4 * (48 // 8)
    assert state["class_names"] == ["blue", "green", "red"]
    for key in ("model", "model_ema", "optimizer", "scheduler", "rng", "args"):
        assert state[key], key
    fused = bool(fused_kwargs([torch.zeros(1)]))  # torch >= 2.4: the fused AdamW kernel on the CPU
    assert all(bool(g["fused"]) == fused for g in state["optimizer"]["param_groups"])
    assert any(k.startswith("aux_head.") for k in state["model"])  # deep supervision is the default
    rows = _rows(trained / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert max(float(r["val_top1"]) for r in rows) > 60.0  # chance is 33%: it learns
    with open(trained / "curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_validate_reproduces_training_metrics_and_writes_json(trained, data, tmp_path):
    best = torch.load(trained / "best.pth", weights_only=True)
    results = tmp_path / "val.json"
    code, stdout, stderr = run_cli("validate", data, "--checkpoint", trained / "best.pth", "-j", "0",
                                   "--results-file", results)
    assert code == 0, stderr
    r = json.loads(results.read_text())
    assert r["images"] == 18 and r["img_size"] == 32 and r["interpolation"] == "bicubic"
    assert r["top1"] == pytest.approx(best["metric"]["val_top1"], abs=1e-6)
    assert r["loss"] == pytest.approx(best["metric"]["val_loss"], rel=1e-5)
    # the deploy form gives the same predictions
    code, _, stderr = run_cli("validate", data, "--checkpoint", trained / "best.pth", "--reparam", "-j", "0",
                              "--results-file", results)
    assert code == 0, stderr
    assert json.loads(results.read_text())["loss"] == pytest.approx(r["loss"], rel=1e-4)
    # the same weights as an official-style file (wrapped under "state_dict"): --model names the architecture
    official = tmp_path / "official_style.pth"
    torch.save({"state_dict": best["model"]}, official)
    code, _, stderr = run_cli("validate", data, "--checkpoint", official, "-j", "0", "--results-file", results)
    assert code == 2 and "--model" in stderr
    code, _, stderr = run_cli("validate", data, "--checkpoint", official, "--model", "test_overlock",
                              "--img-size", "32", "-j", "0", "--results-file", results)
    assert code == 0, stderr
    assert json.loads(results.read_text())["top1"] == pytest.approx(r["top1"], abs=1e-6)
    # EMA weights are a different model
    code, _, stderr = run_cli("validate", data, "--checkpoint", trained / "best_ema.pth", "--use-ema", "-j", "0",
                              "--results-file", results)
    assert code == 0, stderr
    assert json.loads(results.read_text())["loss"] != pytest.approx(r["loss"], rel=1e-6)


@pytest.mark.slow
def test_predict_uses_checkpoint_class_names(trained, data):
    images = [os.path.join(data, "val", "red", "red_000.png"), os.path.join(data, "val", "blue")]
    code, stdout, stderr = run_cli("predict", *images, "--checkpoint", trained / "best.pth", "--json",
                                   "--topk", "2")
    assert code == 0, stderr
    out = json.loads(stdout)
    assert len(out) == 1 + 6
    for item in out:
        assert len(item["top"]) == 2
        assert {t["label"] for t in item["top"]} <= {"red", "green", "blue"}
        assert item["top"][0]["prob"] >= item["top"][1]["prob"] and sum(t["prob"] for t in item["top"]) <= 1 + 1e-6
    code, stdout, _ = run_cli("predict", images[0], "--checkpoint", trained / "best.pth")
    assert code == 0 and stdout.startswith(images[0] + ": ")


@pytest.mark.slow
def test_resume_after_kill_continues_the_same_run(data, tmp_path):
    """kill -9 mid-epoch, --resume: the losses after the resume equal those of an uninterrupted run (which used
    a different number of data workers: augmentation depends on the seed only)."""
    args = ["--data-dir", data, *FAST, "--epochs", "3", "--img-size", "48", "--checkpoint-every", "2",
            "--log-interval", "1", "--mixup", "0.8", "--cutmix", "1.0", "--drop-path", "0.1", "--model-ema",
            "--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25"]
    ref = tmp_path / "ref"
    proc = run_subprocess("train", *args, "--output", ref)
    assert proc.returncode == 0, proc.stderr

    killed = tmp_path / "killed"
    proc = start_subprocess("train", *args, "-j", "2", "--output", killed)
    kill_when(proc, killed / "steps.csv", min_step=9)  # mid-epoch 2 (6 steps per epoch), after the step-8 save
    state = torch.load(killed / "last.pth", weights_only=True)
    assert state["step"] >= 8 and state["batch"] > 0  # a mid-epoch checkpoint is what we resume from
    proc = run_subprocess("train", *args, "-j", "2", "--output", killed, "--resume", killed / "last.pth")
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stderr + proc.stdout

    ref_rows, res_rows = _rows(ref / "steps.csv"), _rows(killed / "steps.csv")
    assert [r["step"] for r in res_rows] == [str(s) for s in range(1, 19)]  # each step once, none lost
    assert [r["loss"] for r in res_rows] == [r["loss"] for r in ref_rows]  # bitwise-equal losses
    a = torch.load(ref / "last.pth", weights_only=True)
    b = torch.load(killed / "last.pth", weights_only=True)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    # every per-epoch number but the timings, including the mean loss of the epoch that was cut by the kill
    timing = {"epoch_time_s", "train_img_per_s"}
    ref_epochs, res_epochs = _rows(ref / "metrics.csv"), _rows(killed / "metrics.csv")
    assert len(res_epochs) == 3 and ref_epochs[1]["train_loss_aux"] != ""
    for a_row, b_row in zip(ref_epochs, res_epochs):
        assert {k: v for k, v in a_row.items() if k not in timing} == {k: v for k, v in b_row.items()
                                                                      if k not in timing}


@pytest.mark.parametrize("flag,value", [("-b", "-4"), ("--epochs", "0"), ("--lr", "-1"), ("--hflip", "1.5"),
                                        ("-j", "x")])
def test_impossible_numbers_are_refused_up_front(data, tmp_path, flag, value):
    i = FAST.index(flag) if flag in FAST else len(FAST)
    argv = FAST[:i] + FAST[i + 2:]  # the flag and its value
    code, _, stderr = run_cli("train", "--data-dir", data, *argv, "--epochs", "1", flag, value,
                              "--output", tmp_path / "o")
    assert code == 2 and flag in stderr and value in stderr and "Traceback" not in stderr
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.slow
def test_without_matplotlib_the_run_says_how_to_get_curves(data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    out = tmp_path / "run"
    code, stdout, stderr = run_cli("train", "--data-dir", data, *FAST, "--epochs", "1", "--mixup", "0",
                                   "--cutmix", "0", "--output", out)
    assert code == 0, stderr
    assert not (out / "curves.png").exists()
    done = stderr[stderr.index("done:"):]
    assert "no curves.png: pip install 'overlock[train]'" in done and "metrics.csv and curves.png" not in done


@pytest.mark.slow
def test_torchrun_two_processes_train_and_validate(data, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "overlock",
           "train", "--data-dir", data, *FAST, "--epochs", "2", "--output", str(out), "--mixup", "0", "--cutmix", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["step"] == 2 * (48 // (8 * 2)) and state["args"]["world_size"] == 2
    assert len(_rows(out / "metrics.csv")) == 2  # written once, by rank 0

    # validation sharded over 2 processes counts every image once: same numbers as one process
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    code, _, stderr = run_cli("validate", data, "--checkpoint", out / "last.pth", "-j", "0", "--results-file", one)
    assert code == 0, stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "overlock",
           "validate", data, "--checkpoint", str(out / "last.pth"), "-j", "0", "-b", "4", "--results-file", str(two)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r1, r2 = json.loads(one.read_text()), json.loads(two.read_text())
    assert r2["world_size"] == 2 and r2["images"] == r1["images"] == 18
    assert r2["top1"] == pytest.approx(r1["top1"]) and r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)


@pytest.mark.slow
def test_corrupt_images_are_skipped_logged_and_counted(data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data, root)
    (root / "train" / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    good = (root / "train" / "green" / "green_000.png").read_bytes()
    (root / "train" / "green" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "val" / "blue" / "empty.png").write_bytes(b"")
    out = tmp_path / "run"
    code, stdout, stderr = run_cli("train", "--data-dir", root, *FAST, "--epochs", "2", "--output", out)
    assert code == 0, stderr
    logged = (out / "bad_images.txt").read_text()
    for name in ("broken.jpg", "truncated.png", "empty.png"):
        assert name in logged
    # unreadable reads per epoch (not cumulative): the val file, plus each bad train file drawn that epoch or
    # passed over while looking for the next readable one (truncated.png's next is broken.jpg): at most 4
    counts = [int(row["bad_images"]) for row in _rows(out / "metrics.csv")]
    assert counts[0] >= 2 and max(counts) <= 4 and len(counts) == 2
    res = tmp_path / "v.json"
    code, _, stderr = run_cli("validate", root, "--checkpoint", out / "last.pth", "-j", "0", "--results-file", res)
    assert code == 0, stderr
    r = json.loads(res.read_text())
    assert r["images"] == 18 and r["unreadable_images"] == 1


@pytest.mark.slow
def test_nan_loss_stops_with_advice_and_keeps_last_good_checkpoint(data, tmp_path):
    out = tmp_path / "nan"
    code, stdout, stderr = run_cli("train", "--data-dir", data, *FAST, "--epochs", "3", "--lr", "1e30",
                                   "--mixup", "0", "--cutmix", "0", "--checkpoint-every", "1", "--output", out)
    assert code == 3
    assert "step" in stderr and "--resume" in stderr and "last.pth" in stderr
    state = torch.load(out / "last.pth", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("case", ["missing_split", "empty_class", "class_mismatch", "no_dir"])
def test_bad_data_is_refused_before_compute(data, tmp_path, case):
    root = tmp_path / "d"
    shutil.copytree(data, root)
    if case == "missing_split":
        shutil.rmtree(root / "val")
        expect = "missing 'val' split"
    elif case == "empty_class":
        os.makedirs(root / "train" / "yellow")
        os.makedirs(root / "val" / "yellow")
        expect = "without images: yellow"
    elif case == "class_mismatch":
        shutil.rmtree(root / "val" / "green")
        expect = "only in train: green"
    else:
        root = tmp_path / "nowhere"
        expect = "no such directory"
    code, _, stderr = run_cli("train", "--data-dir", root, *FAST, "--epochs", "1", "--output", tmp_path / "o")
    assert code == 2
    assert expect in stderr and str(root) in stderr
    assert not os.path.exists(tmp_path / "o" / "last.pth")


@pytest.mark.slow
def test_checkpoint_errors_name_the_file(trained, data, tmp_path):
    # a checkpoint with another class count
    other = tmp_path / "four"
    make_image_folder(other, n_train=4, n_val=2, classes={**{"a": (1, 2, 3), "b": (3, 2, 1)},
                                                          "c": (9, 9, 9), "d": (0, 0, 0)})
    code, _, stderr = run_cli("train", "--data-dir", other, *FAST, "--epochs", "1", "--initial-checkpoint",
                              trained / "best.pth", "--output", tmp_path / "o1")
    assert code == 2 and "3 classes" in stderr and "4" in stderr and "best.pth" in stderr
    assert "--pretrained-path" in stderr
    code, _, stderr = run_cli("train", "--data-dir", other, *FAST, "--epochs", "1", "--resume",
                              trained / "last.pth", "--output", tmp_path / "o2")
    assert code == 2 and "last.pth" in stderr and "classes" in stderr
    code, _, stderr = run_cli("validate", other, "--checkpoint", trained / "best.pth", "-j", "0")
    assert code == 2 and "class folders differ" in stderr
    # --resume needs a run checkpoint
    raw = tmp_path / "raw.pth"
    torch.save(torch.load(trained / "best.pth", weights_only=True)["model"], raw)
    code, _, stderr = run_cli("train", "--data-dir", data, *FAST, "--epochs", "1", "--resume", raw,
                              "--output", tmp_path / "o3")
    assert code == 2 and "raw.pth" in stderr and "--initial-checkpoint" in stderr
    # ... but --initial-checkpoint takes a raw state dict with the same classes
    code, _, stderr = run_cli("train", "--data-dir", data, *FAST, "--epochs", "1", "--initial-checkpoint", raw,
                              "--output", tmp_path / "o4", "--mixup", "0", "--cutmix", "0")
    assert code == 0, stderr
    # an existing run is not overwritten by accident
    code, _, stderr = run_cli("train", "--data-dir", data, *FAST, "--epochs", "1", "--output", tmp_path / "o4")
    assert code == 2 and "--resume" in stderr
    code, _, stderr = run_cli("train", "--data-dir", data, *FAST, "-b", "7", "--epochs", "1", "--output",
                              tmp_path / "o5")
    assert code == 2 and "even batch size" in stderr
