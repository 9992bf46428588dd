"""Mask R-CNN training on COCO-format data with the official recipe, on the project's run machinery.

Shared with classification: torchrun/DDP set-up (``training.distributed``), atomic resumable checkpoints with
RNG state (``training.run_state``), the resumable sampler and per-sample seeds (``data``), the run machinery
(``training.run``: AMP, the optimisation step with its NaN stop, output directory, resume checks, steps.csv),
metrics.csv/curves.png (``training.logbook``).

Recipe (``mask_rcnn_overlock_*_in1k_fpn_{1x,3x}_coco.py``): AdamW (lr 2e-4 for 1x, 1e-4 for 3x), weight decay
0.05 except norms and relative position biases, linear warm-up over 500 iterations from 0.001 x lr, lr x 0.1
at epochs 8 and 11 (1x, 12 epochs) or 27 and 33 (3x, 36 epochs), batch 2 per GPU x 8, horizontal flip 0.5,
3x: short edge drawn from 480, 512, ..., 800 (long edge 1333), or (half of the time) resize to 400-600, random
crop of 384-600 pixels, then that multi-scale resize.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from ..data.folder import DataError, sample_seed, seed_everything
from ..data.sampler import ResumableSampler
from ..training import run_state as ckpt
from ..training.distributed import DistInfo, all_reduce_sum, barrier
from ..training.logbook import Logbook
from ..training.optim import fused_kwargs
from ..training.run import (NonFiniteLoss, StepsLog, autocast_for, check_resume, launch, nan_stop, optimize,
                            prepare_output, report_changed_args, sync_batchnorm, wrap_ddp)
from .build import create_detection_model, detection_checkpoint
from .data import CocoInstances, collate
from .evaluate import evaluate_coco

_logger = logging.getLogger("overlock")

SCHEDULES = {"1x": dict(epochs=12, steps=(8, 11), lr=2e-4), "3x": dict(epochs=36, steps=(27, 33), lr=1e-4)}
MULTISCALE = [(1333, s) for s in range(480, 801, 32)]
LOSS_KEYS = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask")
COLUMNS = ["epoch", "step", "lr", "train_loss", *LOSS_KEYS, "bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "segm_mAP",
           "segm_mAP_50", "segm_mAP_75", "epoch_time_s", "train_img_per_s", "bad_annotations"]


PANELS = [("loss", [("train_loss", "total")] + [(k, k[5:]) for k in LOSS_KEYS]),
          ("COCO AP", [("bbox_mAP", "box AP"), ("bbox_mAP_50", "box AP50"), ("segm_mAP", "mask AP"),
                       ("segm_mAP_50", "mask AP50")]),
          ("learning rate", [("lr", None)])]
STEP_COLUMNS = ("epoch", "batch", "step", "loss", *LOSS_KEYS, "lr")
SUM_KEYS = ("loss", *LOSS_KEYS, "steps")  # the epoch's running sums (over all ranks in a checkpoint)
RUN_DEFINING = ("model", "batch_size", "lr", "epochs", "lr_steps", "seed", "world_size", "img_scale", "schedule")


def param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """Weight decay on every parameter but norms and relative position biases (``rpb``)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if ("norm" in name or ".rpb" in name) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(args, epoch: int, step: int) -> float:
    """mmcv step policy with linear warm-up (by iteration)."""
    lr = args.lr * 0.1 ** sum(epoch >= s for s in args.lr_steps)
    if step < args.warmup_iters:
        k = (1 - step / args.warmup_iters) * (1 - args.warmup_ratio)
        lr = lr * (1 - k)
    return lr


def _apply_schedule_defaults(args) -> None:
    sched = SCHEDULES[args.schedule]
    args.epochs = args.epochs or sched["epochs"]
    args.lr = args.lr or sched["lr"]
    if args.lr_steps is None:
        args.lr_steps = [round(s * args.epochs / sched["epochs"]) for s in sched["steps"]]
    if args.multiscale is None:
        args.multiscale = args.schedule == "3x"
    if args.crop_aug is None:
        args.crop_aug = args.schedule == "3x"


class DetectionTrainer:
    def __init__(self, args, info: DistInfo):
        self.args, self.info = args, info
        _apply_schedule_defaults(args)
        self.train_set = CocoInstances(args.train_ann, args.train_images, train=True, flip=args.flip)
        self.val_set = CocoInstances(args.val_ann, args.val_images or args.train_images) if args.val_ann else None
        self.classes = self.train_set.class_names
        if self.val_set is not None and self.val_set.cat_ids != self.train_set.cat_ids:
            raise DataError(f"--val-ann {args.val_ann}: other categories than --train-ann {args.train_ann}")
        resume = None
        if args.resume:
            resume = ckpt.read_run_checkpoint(args.resume)
            check_resume(resume, args.resume, self.classes, args.model, f"--train-ann {args.train_ann}")
        self.output = prepare_output(args, f"maskrcnn-{args.model}", info)
        if info.is_main:
            with open(os.path.join(self.output, "bad_annotations.txt"), "w") as f:
                f.write("\n".join(self.train_set.problems + (self.val_set.problems if self.val_set else [])) + "\n")
            if self.train_set.report:
                _logger.warning("%s: %s (named in bad_annotations.txt)", args.train_ann, self.train_set.summary())
        args.world_size = info.world_size
        seed_everything(args.seed + info.rank)
        scale = (max(args.img_scale), min(args.img_scale))
        self.model = create_detection_model(
            args.model, num_classes=len(self.classes), class_names=self.classes, fpn_channels=args.fpn_channels,
            representation_size=args.box_fc, mask_channels=args.mask_channels, drop_path_rate=args.drop_path,
            test_scale=scale, train_scales=MULTISCALE if args.multiscale else [scale], crop_aug=args.crop_aug)
        self.model.roi_heads.fg_bg_sampler.batch_size_per_image = args.rcnn_samples
        if args.pretrained_path:
            from .build import load_detection_checkpoint
            load_detection_checkpoint(self.model, args.pretrained_path)
        self.model.to(info.device)
        self.model = sync_batchnorm(self.model, info, getattr(args, "sync_bn", False))
        self.optimizer = torch.optim.AdamW(param_groups(self.model, args.weight_decay), lr=args.lr,
                                           betas=(0.9, 0.999), **fused_kwargs(self.model.parameters()))
        self.autocast, self.scaler = autocast_for(args, info.device)
        self.sampler = ResumableSampler(len(self.train_set), args.batch_size, args.seed, info.rank, info.world_size)
        self.loader = torch.utils.data.DataLoader(self.train_set, batch_size=args.batch_size, sampler=self.sampler,
                                                  collate_fn=collate, num_workers=args.workers,
                                                  persistent_workers=False)
        self.steps_per_epoch = self.sampler.batches_per_epoch
        self.epoch, self.batch, self.step = 0, 0, 0
        self.best = {"bbox_mAP": None, "epoch": None}
        self.sums = dict.fromkeys(SUM_KEYS, 0.0)  # this rank's sums in the current epoch
        if resume is not None:
            self._restore(resume)
        self.net = wrap_ddp(self.model, info, find_unused=True)
        self.logbook = Logbook(self.output, self.step, COLUMNS, PANELS, tensorboard=False) if info.is_main else None
        self.steps_log = StepsLog(os.path.join(self.output, "steps.csv"), STEP_COLUMNS, self.step) \
            if info.is_main else None

    # ------------------------------------------------------------------ state
    def _restore(self, state: Dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batch, self.step = state["epoch"], state["batch"], state["step"]
        self.best = dict(self.best, **state.get("best", {}))
        if self.batch and self.info.is_main:  # mid-epoch: rank 0 carries the sums of all ranks so far
            self.sums.update(state.get("epoch_sums") or {})
        ckpt.set_rng_state(state["rng"])
        report_changed_args(state, self.args, RUN_DEFINING)
        _logger.info("resuming %s at epoch %d, batch %d (step %d)", self.args.resume, self.epoch, self.batch,
                     self.step)

    def _epoch_totals(self) -> Dict[str, float]:
        """The epoch's sums over all ranks (a collective: every rank calls it)."""
        return dict(zip(SUM_KEYS, all_reduce_sum([self.sums[k] for k in SUM_KEYS], self.info)))

    def save(self, name: str = "last.pth", metric: Optional[Dict] = None,
             epoch_sums: Optional[Dict[str, float]] = None) -> None:
        if not self.info.is_main:
            return
        state = ckpt.training_state(model=self.model, model_ema=None, optimizer=self.optimizer, scheduler=None,
                                    scaler=self.scaler, epoch=self.epoch, batch=self.batch, step=self.step,
                                    args=self.args, classes=self.classes, best=self.best, metric=metric,
                                    epoch_sums=epoch_sums)
        info = detection_checkpoint(self.model, self.train_set.cat_ids)
        state.update(task="detection", category_ids=info["category_ids"], detection_config=info["detection_config"])
        ckpt.atomic_save(state, os.path.join(self.output, name))

    # ------------------------------------------------------------------ steps
    def train_step(self, images, targets) -> Dict[str, float]:
        args, info = self.args, self.info
        seed_everything(sample_seed(args.seed + 1, self.epoch, self.batch * info.world_size + info.rank))
        lr = lr_at(args, self.epoch, self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        images = [im.to(info.device) for im in images]
        targets = [{k: (v.to(info.device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        with self.autocast():
            losses = self.net(images, targets)
        loss = sum(losses.values())
        optimize(loss, self.model, self.optimizer, self.scaler, info,
                 f"epoch {self.epoch}, batch {self.batch} (step {self.step + 1})", args.clip_grad)
        return {"loss": loss.item(), **{k: v.item() for k, v in losses.items()}, "lr": lr}

    def train_epoch(self) -> Dict[str, float]:
        from tqdm import tqdm
        args, info = self.args, self.info
        if self.batch >= self.steps_per_epoch:
            return {}
        self.sampler.set_epoch(self.epoch, self.batch)
        self.model.train()
        if self.batch == 0:
            self.sums = dict.fromkeys(SUM_KEYS, 0.0)
        sums = self.sums
        images_seen, start = 0, time.perf_counter()
        bar = tqdm(self.loader, total=self.steps_per_epoch, initial=self.batch, desc=f"epoch {self.epoch + 1}/"
                   f"{args.epochs}", unit="batch", leave=False, dynamic_ncols=True,
                   disable=None if info.is_main else True)
        for images, targets in bar:
            if images:
                out = self.train_step(images, targets)
                for k in SUM_KEYS[:-1]:
                    sums[k] += out.get(k, 0.0)
                sums["steps"] += 1
                images_seen += len(images) * info.world_size
            self.step += 1
            self.batch += 1
            if info.is_main and images:
                bar.set_postfix(loss=f"{out['loss']:.4f}", lr=f"{out['lr']:.2e}")
                if self.step % args.log_interval == 0:
                    self.steps_log.append(self.epoch, self.batch, self.step, out["loss"],
                                          *(out.get(k, "") for k in LOSS_KEYS), out["lr"])
            if args.checkpoint_every and self.step % args.checkpoint_every == 0 and self.batch < self.steps_per_epoch:
                self.save(epoch_sums=self._epoch_totals())
        bar.close()
        elapsed = time.perf_counter() - start
        totals = self._epoch_totals()  # mean over all ranks' steps
        n_all = max(totals["steps"], 1)
        row = {"train_loss": totals["loss"] / n_all, "epoch_time_s": elapsed,
               "train_img_per_s": images_seen / max(elapsed, 1e-9)}
        row.update({k: totals[k] / n_all for k in LOSS_KEYS})
        return row

    def evaluate(self) -> Dict[str, float]:
        if self.val_set is None:
            return {}
        if (self.epoch + 1) % max(self.args.val_freq, 1) and self.epoch + 1 != self.args.epochs:
            return {}
        # evaluated in float32 (exact test path; bfloat16 autocast also trips the backbone's no-grad CPU kernel)
        metrics, results, table = evaluate_coco(self.model, self.val_set, self.info)
        if self.info.is_main:
            _logger.info(table)
            with open(os.path.join(self.output, "eval.json"), "w") as f:
                json.dump({"epoch": self.epoch + 1, **metrics}, f, indent=2)
        return metrics

    def fit(self) -> int:
        args, info = self.args, self.info
        if info.is_main:
            n_params = sum(p.numel() for p in self.model.parameters())
            _logger.info("Mask R-CNN %s: %.2f M parameters, %d classes, %d train / %s val images, %d x %d per step, "
                         "lr %.3g, %d epochs (steps at %s, %d iterations each) -> %s", args.model, n_params / 1e6,
                         len(self.classes), len(self.train_set), len(self.val_set) if self.val_set else "no",
                         args.batch_size, info.world_size, args.lr, args.epochs, args.lr_steps,
                         self.steps_per_epoch, self.output)
        while self.epoch < args.epochs:
            try:
                row = self.train_epoch()
            except NonFiniteLoss as e:
                return nan_stop(e, self.output, "detect-train", args.amp, logbook=self.logbook)
            metrics = self.evaluate()
            row = {"epoch": self.epoch, "step": self.step, "lr": lr_at(args, self.epoch, max(self.step - 1, 0)),
                   **row, **metrics, "bad_annotations": sum(self.train_set.report.values())}
            improved = metrics.get("bbox_mAP") is not None and (self.best["bbox_mAP"] is None
                                                                 or metrics["bbox_mAP"] > self.best["bbox_mAP"])
            if improved:
                self.best = {"bbox_mAP": metrics["bbox_mAP"], "segm_mAP": metrics.get("segm_mAP"),
                             "epoch": self.epoch}
            self.epoch, self.batch = self.epoch + 1, 0
            if info.is_main:
                self.logbook.append(row)
                self.save("last.pth", metric=metrics)
                if improved:
                    self.save("best.pth", metric=metrics)
                parts = [f"epoch {self.epoch}/{args.epochs}", f"loss {row.get('train_loss', float('nan')):.4f}"]
                if "bbox_mAP" in metrics:
                    parts.append(f"box AP {100 * metrics['bbox_mAP']:.1f} mask AP {100 * metrics['segm_mAP']:.1f}")
                parts.append(f"lr {row['lr']:.2e}")
                _logger.info(" | ".join(parts))
            barrier(info)
        if info.is_main:
            self.logbook.close()
            best = self.best.get("bbox_mAP")
            _logger.info("done: best box AP %s; checkpoints, metrics.csv, curves.png and eval.json in %s",
                         "-" if best is None else f"{100 * best:.1f}", self.output)
        return 0


def train(args) -> int:
    return launch(DetectionTrainer, args)
