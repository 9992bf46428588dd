"""The run machinery shared by ``train``, ``train-seg`` and ``detect-train`` (``overlock.training.run``,
``overlock.training.logbook``): the optimisation step's NaN guards, the logs' trimming on resume, and, end to end
for segmentation and detection, exact resume after ``kill -9`` and the NaN stop."""
from __future__ import annotations

import csv
import hashlib
import os

import pytest
import torch

from cli_helpers import kill_when, run_cli, run_subprocess, start_subprocess
from overlock.training.distributed import DistInfo
from overlock.training.logbook import Logbook
from overlock.training.run import NonFiniteLoss, StepsLog, optimize

TIMING = {"epoch_time_s", "interval_time_s", "train_img_per_s"}


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _without_timings(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# ---------------------------------------------------------------------------------------------- unit tests
def _toy():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_optimize_steps_and_clips():
    model, opt = _toy()
    before = [p.detach().clone() for p in model.parameters()]
    optimize(1e3 * model(torch.ones(4, 3)).sum(), model, opt, None, DistInfo(), "step 1", clip_grad=1e-3)
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert grads.norm().item() == pytest.approx(1e-3, rel=1e-5)  # clipped to the total norm asked for
    for p, b in zip(model.parameters(), before):  # plain SGD: the weights moved by lr x the clipped gradient
        torch.testing.assert_close(p.detach(), b - 0.1 * p.grad)


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_optimize_stops_before_touching_the_weights(kind):
    model, opt = _toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(torch.ones(4, 3)).sum()
    if kind == "loss":
        loss = out * float("nan")
    else:  # finite value, NaN gradient: d/dw sqrt(|w - w|) is inf x 0
        w = model.weight
        loss = out + 0.0 * (w - w.detach()).abs().sqrt().sum()
        assert torch.isfinite(loss)
    with pytest.raises(NonFiniteLoss, match="at epoch 0, batch 4"):
        optimize(loss, model, opt, None, DistInfo(), "epoch 0, batch 4")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_steps_log_and_logbook_drop_rows_past_the_resume_point(tmp_path):
    log = StepsLog(str(tmp_path / "steps.csv"), ("iteration", "loss"), step_key="iteration")
    for it in range(1, 6):
        log.append(it, 0.5 / it)
    StepsLog(str(tmp_path / "steps.csv"), ("iteration", "loss"), resume_step=3, step_key="iteration")
    assert [r["iteration"] for r in _rows(tmp_path / "steps.csv")] == ["1", "2", "3"]

    book = Logbook(str(tmp_path), columns=["epoch", "step", "lr"], panels=[("lr", [("lr", None)])],
                   tensorboard=False)
    for epoch in range(3):
        book.append({"epoch": epoch, "step": 4 * (epoch + 1), "lr": 0.1, "extra": 1.0})
    assert os.path.exists(tmp_path / "curves.png")
    # resumed from a checkpoint in the middle of epoch 2 (step 10): epoch 2's row was written after it
    book = Logbook(str(tmp_path), resume_step=10, columns=["epoch", "step", "lr"], panels=[], tensorboard=False)
    assert [r["epoch"] for r in _rows(tmp_path / "metrics.csv")] == ["0", "1"]
    assert list(_rows(tmp_path / "metrics.csv")[0]) == ["epoch", "step", "lr"]


# ---------------------------------------------------------------------------------------------- detection
@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    pytest.importorskip("pycocotools")
    pytest.importorskip("skimage")
    from overlock.detection.demo import write_demo_dataset
    paths = write_demo_dataset(str(tmp_path_factory.mktemp("coco")), n_train=8, n_val=2, size=48, seed=0)
    return paths["train"], paths["val"]


def detect_args(coco, epochs=2):
    (tr_ann, tr_img), (va_ann, va_img) = coco
    return ["detect-train", "--train-ann", tr_ann, "--train-images", tr_img, "--val-ann", va_ann, "--val-images",
            va_img, "--model", "test_overlock", "--fpn-channels", "16", "--box-fc", "32", "--mask-channels", "16",
            "--img-scale", "48", "48", "-b", "2", "--warmup-iters", "3", "--lr", "1e-3", "--lr-steps", "1",
            "--epochs", str(epochs), "--val-freq", str(epochs), "--log-interval", "1"]


@pytest.mark.slow
def test_detect_train_resume_after_kill_equals_an_uninterrupted_run(coco, tmp_path):
    """kill -9 in the middle of an epoch, --resume from the mid-epoch checkpoint: every step's losses, every
    epoch's row (mean losses, AP) and the final weights equal an uninterrupted run's, which used no data workers."""
    args = detect_args(coco) + ["--checkpoint-every", "3"]  # 4 steps per epoch: mid-epoch saves at steps 3, 6
    ref = tmp_path / "ref"
    proc = run_subprocess(*args, "-j", "0", "--output", ref)
    assert proc.returncode == 0, proc.stderr

    killed = tmp_path / "killed"
    proc = start_subprocess(*args, "-j", "2", "--output", killed)
    kill_when(proc, killed / "steps.csv", min_step=7)  # in epoch 1, after the step-6 save
    state = torch.load(killed / "last.pth", weights_only=True)
    assert (state["epoch"], state["batch"], state["step"]) == (1, 2, 6)  # the step counter matches the position
    assert state["epoch_sums"]["steps"] == 2  # the epoch's loss sums so far travel with it
    proc = run_subprocess(*args, "-j", "2", "--output", killed, "--resume", killed / "last.pth")
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stderr

    ref_steps, res_steps = _rows(ref / "steps.csv"), _rows(killed / "steps.csv")
    assert [r["step"] for r in res_steps] == [str(s) for s in range(1, 9)]  # each step once
    assert res_steps == ref_steps  # bitwise-equal losses and lr
    assert _without_timings(_rows(killed / "metrics.csv")) == _without_timings(_rows(ref / "metrics.csv"))
    assert len(_rows(ref / "metrics.csv")) == 2 and _rows(ref / "metrics.csv")[1]["bbox_mAP"] != ""
    a = torch.load(ref / "last.pth", weights_only=True)
    b = torch.load(killed / "last.pth", weights_only=True)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    assert a["best"] == b["best"]


def _nan_at(monkeypatch, module, call: int, last: str):
    """Make the ``call``-th optimisation step's loss NaN, noting last.pth's hash at that moment."""
    real, seen = module.optimize, {"calls": 0}

    def optimize(loss, *args, **kwargs):
        seen["calls"] += 1
        if seen["calls"] == call:
            seen["sha"] = _sha(last)
            loss = loss * float("nan")
        return real(loss, *args, **kwargs)
    monkeypatch.setattr(module, "optimize", optimize)
    return seen


@pytest.mark.slow
def test_detect_train_nan_loss_stops_and_keeps_the_last_good_checkpoint(coco, tmp_path, monkeypatch):
    import overlock.detection.train as det
    out = tmp_path / "nan"
    seen = _nan_at(monkeypatch, det, call=3, last=str(out / "last.pth"))
    code, _, stderr = run_cli(*detect_args(coco, epochs=2), "-j", "0", "--checkpoint-every", "1", "--output", out)
    assert code == 3, stderr
    assert "loss is nan at epoch 0, batch 2 (step 3)" in stderr
    assert f"overlock detect-train ... --resume {out / 'last.pth'}" in stderr
    assert _sha(out / "last.pth") == seen["sha"]  # nothing written after the last good step
    assert torch.load(out / "last.pth", weights_only=True)["step"] == 2


# ---------------------------------------------------------------------------------------------- segmentation
SEG = ["--model", "test_overlock", "--channels", "16", "--aux-channels", "8", "--crop-size", "48", "48",
       "--scale", "48", "48", "-b", "4", "--warmup-iters", "2", "--lr", "1e-3", "--log-interval", "1"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    pytest.importorskip("sklearn")
    pytest.importorskip("skimage")
    from overlock.data.scenes import write_segmentation_dataset
    root = tmp_path_factory.mktemp("scenes")
    write_segmentation_dataset(str(root), n_train=16, n_val=4, size=48, seed=0)
    return root


@pytest.mark.slow
def test_train_seg_resume_after_kill_equals_an_uninterrupted_run(scenes, tmp_path):
    """kill -9 between evaluations, --resume from the last --checkpoint-interval save: the same iterations, the
    same interval rows (mean losses, mIoU) and the same final weights as an uninterrupted run."""
    args = ["train-seg", "--data-dir", scenes, *SEG, "--iters", "12", "--eval-interval", "6",
            "--checkpoint-interval", "4"]
    ref = tmp_path / "ref"
    proc = run_subprocess(*args, "-j", "0", "--output", ref)
    assert proc.returncode == 0, proc.stderr

    killed = tmp_path / "killed"
    proc = start_subprocess(*args, "-j", "2", "--output", killed)
    kill_when(proc, killed / "steps.csv", min_step=9, step_column=0)  # after the iteration-8 save
    state = torch.load(killed / "last.pth", weights_only=True)
    assert state["step"] == 8 and state["interval_sums"][2] == 2  # two iterations into the second interval
    proc = run_subprocess(*args, "-j", "2", "--output", killed, "--resume", killed / "last.pth")
    assert proc.returncode == 0, proc.stderr

    ref_steps, res_steps = _rows(ref / "steps.csv"), _rows(killed / "steps.csv")
    assert [r["iteration"] for r in res_steps] == [str(i) for i in range(1, 13)]
    assert res_steps == ref_steps
    ref_rows = _rows(ref / "metrics.csv")
    assert [r["iteration"] for r in ref_rows] == ["6", "12"]
    assert _without_timings(_rows(killed / "metrics.csv")) == _without_timings(ref_rows)
    a = torch.load(ref / "last.pth", weights_only=True)["model"]
    b = torch.load(killed / "last.pth", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.slow
def test_train_seg_nan_loss_stops_and_keeps_the_last_good_checkpoint(scenes, tmp_path, monkeypatch):
    import overlock.segmentation.train as seg
    out = tmp_path / "nan"
    seen = _nan_at(monkeypatch, seg, call=3, last=str(out / "last.pth"))
    code, _, stderr = run_cli("train-seg", "--data-dir", scenes, *SEG, "-j", "0", "--iters", "6",
                              "--eval-interval", "6", "--checkpoint-interval", "1", "--output", out)
    assert code == 3, stderr
    assert "loss is nan at iteration 3" in stderr
    assert f"overlock train-seg ... --resume {out / 'last.pth'}" in stderr
    assert _sha(out / "last.pth") == seen["sha"]
    assert torch.load(out / "last.pth", weights_only=True)["step"] == 2
    assert [r["iteration"] for r in _rows(out / "steps.csv")] == ["1", "2"]
