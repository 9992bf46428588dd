"""``overlock train-seg``: the official UperNet recipe (mmseg iteration-based runner), on the project's run machinery.

Shared with classification: torchrun/DDP setup and exact reductions (``training.distributed``), atomic
resumable run states with RNG (``training.run_state``), the run machinery (``training.run``: AMP, the
optimisation step with its NaN stop, output directory, resume checks, steps.csv), metrics.csv/curves.png
(``training.logbook``), the resumable sampler (``data.sampler``) and the per-sample seeding rule. Specific
here: iterations instead of epochs (evaluation and checkpoints every N iterations), the poly schedule with
linear warm-up (mmcv's ``PolyLrUpdaterHook``), AdamW parameter groups by name (mmcv's
``paramwise_cfg.custom_keys``), the pixel loss (mmseg's cross-entropy: ignore index 255, mean over all pixels of
the batch) and mIoU evaluation.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data import DataError
from ..data.folder import sample_seed, seed_everything
from ..data.sampler import ResumableSampler, ShardSampler
from ..errors import UsageError
from ..training import run_state as ckpt
from ..training.distributed import DistInfo, all_reduce_sum, barrier
from ..training.logbook import Logbook
from ..training.optim import fused_kwargs
from ..training.run import (NonFiniteLoss, StepsLog, autocast_for, check_resume, duration, launch, nan_stop,
                            optimize, prepare_output, report_changed_args, sync_batchnorm, wrap_ddp)
from .data import SegDataset, TrainPipeline, collate_eval, find_layout
from .inference import infer
from .metrics import IoUAccumulator, summarize
from .model import OverLoCKUperNet, create_segmentation_model, load_segmentation_checkpoint

_logger = logging.getLogger("overlock")

RUN_DEFINING = ("model", "batch_size", "lr", "iters", "seed", "world_size", "crop_size", "aux_loss_weight")
SEG_COLUMNS = ["epoch", "iteration", "lr", "train_loss", "train_loss_aux", "mIoU", "mAcc", "aAcc", "interval_time_s",
               "train_img_per_s", "bad_images"]
SEG_PANELS = [("loss", [("train_loss", "train_loss"), ("train_loss_aux", "train_loss_aux")]),
              ("validation (%)", [("mIoU", "mIoU"), ("mAcc", "mAcc"), ("aAcc", "aAcc")]),
              ("learning rate", [("lr", "lr")])]
STEP_COLUMNS = ("iteration", "loss", "loss_aux", "lr")


def seg_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255,
             class_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """mmseg 0.30's decode loss: logits resized to the labels (bilinear), cross-entropy with the ignore index,
    averaged over all pixels (ignored ones count as 0: ``avg_non_ignore=False``, its default). ``class_weight``
    scales each pixel's loss by its true class's weight, still divided by the pixel count (mmseg's
    ``CrossEntropyLoss(class_weight=...)``)."""
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits.float(), labels, weight=class_weight, ignore_index=ignore_index,
                           reduction="none").mean()


def poly_lr_factor(iteration: int, max_iters: int, warmup_iters: int, warmup_ratio: float, power: float = 1.0,
                   min_lr_ratio: float = 0.0) -> float:
    """mmcv ``PolyLrUpdaterHook`` with linear warm-up, as a factor of the base lr for 0-based ``iteration``."""
    factor = (1 - iteration / max_iters) ** power * (1 - min_lr_ratio) + min_lr_ratio
    if iteration < warmup_iters:
        factor *= 1 - (1 - iteration / warmup_iters) * (1 - warmup_ratio)
    return factor


def param_groups(model: nn.Module, weight_decay: float, no_decay_keys) -> List[Dict]:
    """mmcv ``custom_keys`` with ``decay_mult=0``: parameters whose name contains one of the keys get no decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(k in name for k in no_decay_keys) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate_segmentation(model: OverLoCKUperNet, loader, info: DistInfo, class_names: List[str],
                          autocast=contextlib.nullcontext, mode: str = "whole", crop=(512, 512), stride=(341, 341),
                          desc: str = "val") -> Dict:
    """mIoU/mAcc/aAcc and the per-class table over every usable image of ``loader`` (exact over ranks)."""
    model.eval()
    acc = IoUAccumulator(len(class_names))
    bar = tqdm(loader, desc=desc, leave=False, disable=None if info.is_main else True, dynamic_ncols=True)
    start = time.perf_counter()
    for batch in bar:
        if batch is None:
            continue
        x, label, _ = batch
        x = x.to(info.device, non_blocking=True)
        with autocast():
            logits = infer(model, x, label.shape[-2:], mode, crop, stride)
        acc.update(logits.float().argmax(1)[0], label[0])
    acc.reduce(info)
    if acc.images == 0:
        raise DataError(f"{desc}: no usable image/mask pair to evaluate")
    out = summarize(acc.totals, class_names)
    out.update(images=acc.images, seconds=time.perf_counter() - start)
    return out


def _eval_loader(dataset, info: DistInfo, workers: int):
    kw = dict(num_workers=workers, persistent_workers=workers > 0)
    return torch.utils.data.DataLoader(dataset, batch_size=1, sampler=ShardSampler(len(dataset), info.rank,
                                       info.world_size), collate_fn=collate_eval, **kw)


class SegTrainer:
    """One run: model, optimizer, data; ``fit()`` trains to ``--iters``, evaluating every ``--eval-interval``."""

    def __init__(self, args, info: DistInfo):
        self.args, self.info = args, info
        layout = find_layout(args.data_dir, (args.train_split, args.val_split), args.reduce_zero_label)
        self.classes = layout.classes
        if args.class_weight is not None and len(args.class_weight) != len(self.classes):
            raise UsageError(f"--class-weight: {len(args.class_weight)} weights for {len(self.classes)} classes "
                             f"({', '.join(self.classes[:4])}{', ...' if len(self.classes) > 4 else ''}); give one "
                             "weight per class, in the order of the class list")
        if args.batch_size is None:
            args.batch_size = max(1, 16 // info.world_size)  # the official global batch of 16
        args.world_size = info.world_size
        resume = ckpt.read_run_checkpoint(args.resume) if args.resume else None
        if resume is not None:
            check_resume(resume, args.resume, self.classes, args.model, "--data-dir")
        self.output = prepare_output(args, f"upernet_{args.model}", info)
        seed_everything(args.seed + info.rank)

        extra = {} if args.drop_path is None else {"drop_path_rate": args.drop_path}
        self.model = create_segmentation_model(
            args.model, len(self.classes), channels=args.channels, aux_channels=args.aux_channels,
            aux_head=args.aux_loss_weight > 0, class_names=self.classes, **extra)
        if args.pretrained_path and resume is None:
            load_segmentation_checkpoint(self.model, args.pretrained_path, f"--pretrained-path {args.pretrained_path}",
                                         fresh_classifier=True)
        self.model.to(info.device)
        self.model = sync_batchnorm(self.model, info, args.sync_bn)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, args.weight_decay, args.no_decay_keys),
                                           lr=args.lr, betas=(0.9, 0.999), **fused_kwargs(self.model.parameters()))
        self.autocast, self.scaler = autocast_for(args, info.device)
        self.class_weight = None if args.class_weight is None else torch.tensor(
            args.class_weight, dtype=torch.float32, device=info.device)

        bad_log = os.path.join(self.output, "bad_images.txt") if info.is_main else None
        pipeline = TrainPipeline(crop_size=args.crop_size, scale=args.scale, ratio_range=args.ratio_range,
                                 cat_max_ratio=args.cat_max_ratio, flip=args.flip, photometric=not args.no_photometric)
        self.train_set = SegDataset(layout.splits[args.train_split], len(self.classes), layout.reduce_zero_label,
                                    pipeline, bad_log=bad_log)
        self.val_set = SegDataset(layout.splits[args.val_split], len(self.classes), layout.reduce_zero_label,
                                  None, test_scale=args.scale, bad_log=bad_log)
        syncbn = info.distributed and args.sync_bn and info.device.type == "cuda"
        if args.batch_size * (info.world_size if syncbn else 1) < 2:
            raise DataError(f"-b/--batch-size {args.batch_size}: BatchNorm of the 1x1 pyramid-pooling branch needs at "
                            "least 2 images per batch (per process, or over all GPUs with SyncBN); use -b 2 or more")
        if len(self.train_set) < args.batch_size * info.world_size:
            raise DataError(f"{args.data_dir}: {len(self.train_set)} training pairs, fewer than one batch "
                            f"({args.batch_size} x {info.world_size} processes); lower --batch-size")
        self.sampler = ResumableSampler(len(self.train_set), args.batch_size, args.seed, info.rank, info.world_size)
        kw = dict(num_workers=args.workers, pin_memory=info.device.type == "cuda")
        self.loader = torch.utils.data.DataLoader(self.train_set, batch_size=args.batch_size, sampler=self.sampler,
                                                  drop_last=True, **kw)
        self.val_loader = _eval_loader(self.val_set, info, args.workers)

        self.iteration, self.best = 0, {"mIoU": None, "iteration": None}
        self.interval_sums = [0.0, 0.0, 0]
        if resume is not None:
            self._restore(resume)
        self.net = wrap_ddp(self.model, info)
        self.logbook = Logbook(self.output, self.iteration, SEG_COLUMNS, SEG_PANELS, x_key="iteration",
                               step_key="iteration", tensorboard=False) if info.is_main else None
        self.steps_log = StepsLog(os.path.join(self.output, "steps.csv"), STEP_COLUMNS, self.iteration,
                                  step_key="iteration") if info.is_main else None

    # --------------------------------------------------------------------------------------------- state
    def _restore(self, state: Dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.iteration = state["step"]
        self.interval_sums = list(state.get("interval_sums") or [0.0, 0.0, 0])
        self.best = dict(self.best, **state.get("best", {}))
        ckpt.set_rng_state(state["rng"])
        report_changed_args(state, self.args, RUN_DEFINING)
        _logger.info("resuming %s at iteration %d", self.args.resume, self.iteration)

    def save(self, name: str, metric: Optional[Dict] = None) -> None:
        if not self.info.is_main:
            return
        epoch, batch = divmod(self.iteration, self.sampler.batches_per_epoch)
        state = ckpt.training_state(model=self.model, model_ema=None, optimizer=self.optimizer, scheduler=None,
                                    scaler=self.scaler, epoch=epoch, batch=batch, step=self.iteration, args=self.args,
                                    classes=self.classes, best=self.best, metric=metric)
        state["seg_model"] = ckpt._plain({"model": self.args.model, **self.model.config})
        state["interval_sums"] = list(self.interval_sums)
        ckpt.atomic_save(state, os.path.join(self.output, name))

    # --------------------------------------------------------------------------------------------- steps
    def _set_lr(self) -> float:
        a = self.args
        lr = a.lr * poly_lr_factor(self.iteration, a.iters, a.warmup_iters, a.warmup_ratio, a.power,
                                   a.min_lr / a.lr if a.lr else 0.0)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def train_step(self, images: torch.Tensor, labels: torch.Tensor):
        args, info = self.args, self.info
        seed_everything(sample_seed(args.seed + 1, self.iteration, info.rank))  # dropout, drop path
        lr = self._set_lr()
        images, labels = images.to(info.device, non_blocking=True), labels.to(info.device, non_blocking=True)
        self.net.train()
        with self.autocast():
            decode, aux = self.net(images, return_heads=True)  # through DDP's forward, for its gradient hooks
            loss_main = seg_loss(decode, labels, class_weight=self.class_weight)
            loss_aux = seg_loss(aux, labels, class_weight=self.class_weight) if aux is not None else None
            loss = loss_main + (args.aux_loss_weight * loss_aux if loss_aux is not None else 0.0)
        optimize(loss, self.model, self.optimizer, self.scaler, info, f"iteration {self.iteration + 1}")
        self.iteration += 1
        return loss_main.item(), (loss_aux.item() if loss_aux is not None else None), lr

    def evaluate(self) -> Dict:
        a = self.args
        return evaluate_segmentation(self.model, self.val_loader, self.info, self.classes, self.autocast, a.mode,
                                     tuple(a.crop_size), tuple(a.stride))

    def fit(self) -> int:
        args, info = self.args, self.info
        if info.is_main:
            n = sum(p.numel() for p in self.model.parameters())
            _logger.info("UperNet-%s: %.2f M parameters, %d classes, %d train / %d val pairs, %d x %d per step, lr %.3g,"
                         " %d iterations -> %s", args.model, n / 1e6, len(self.classes), len(self.train_set),
                         len(self.val_set), args.batch_size, info.world_size, args.lr, args.iters, self.output)
        bpe = self.sampler.batches_per_epoch
        bar = tqdm(total=args.iters, initial=self.iteration, desc="train", unit="it", dynamic_ncols=True,
                   disable=None if info.is_main else True)
        start, seen, run_start, first = time.perf_counter(), 0, time.perf_counter(), self.iteration
        sums = self.interval_sums  # losses since the last evaluation (restored on resume: same averages)
        try:
            while self.iteration < args.iters:
                epoch, batch = divmod(self.iteration, bpe)
                self.sampler.set_epoch(epoch, batch)
                for images, labels in self.loader:
                    loss, loss_aux, lr = self.train_step(images, labels)
                    sums[0] += loss
                    sums[1] += loss_aux or 0.0
                    sums[2] += 1
                    seen += images.shape[0] * info.world_size
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                    it = self.iteration
                    if info.is_main and it % args.log_interval == 0:
                        self.steps_log.append(it, loss, loss_aux, lr)
                    if it % args.eval_interval == 0 or it == args.iters:
                        elapsed = time.perf_counter() - start
                        row = {"epoch": epoch, "iteration": it, "lr": lr, "train_loss": sums[0] / max(sums[2], 1),
                               "train_loss_aux": sums[1] / max(sums[2], 1) if self.model.auxiliary_head else None,
                               "interval_time_s": elapsed, "train_img_per_s": seen / max(elapsed, 1e-9)}
                        self._evaluate_and_log(row, run_start, first)
                        sums[:] = [0.0, 0.0, 0]
                        start, seen = time.perf_counter(), 0
                    elif args.checkpoint_interval and it % args.checkpoint_interval == 0:
                        self.save("last.pth")
                    if args.stop_after and it - first >= args.stop_after and it < args.iters:
                        self.save("last.pth")
                        bar.close()
                        _logger.info("stopped after %d iterations (--stop-after) at iteration %d; continue with "
                                     "--resume %s", it - first, it, os.path.join(self.output, "last.pth"))
                        return 0
                    if it >= args.iters:
                        break
        except NonFiniteLoss as e:
            bar.close()
            return nan_stop(e, self.output, "train-seg", args.amp, clip_flag=False, logbook=self.logbook)
        bar.close()
        if info.is_main:
            _logger.info("done: best mIoU %s at iteration %s; checkpoints, metrics.csv and curves.png in %s",
                         "-" if self.best["mIoU"] is None else f"{self.best['mIoU']:.2f}", self.best["iteration"],
                         self.output)
        return 0

    def _evaluate_and_log(self, row: Dict, run_start: float, first: int) -> None:
        m = self.evaluate()
        bad = int(all_reduce_sum([self.train_set.bad_count.value + self.val_set.bad_count.value], self.info)[0])
        row.update(mIoU=m["mIoU"], mAcc=m["mAcc"], aAcc=m["aAcc"], bad_images=bad)
        improved = m["mIoU"] is not None and (self.best["mIoU"] is None or m["mIoU"] > self.best["mIoU"])
        if improved:
            self.best = {"mIoU": m["mIoU"], "iteration": self.iteration}
        if self.info.is_main:
            metric = {k: m[k] for k in ("mIoU", "mAcc", "aAcc")}
            self.logbook.append(row)
            self.save("last.pth", metric)
            if improved:
                self.save("best.pth", metric)
            done = self.iteration - first
            eta = (time.perf_counter() - run_start) / max(done, 1) * (self.args.iters - self.iteration)
            fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
            _logger.info("iteration %d/%d | loss %.4f%s | mIoU %s mAcc %s aAcc %s | lr %.2e | %.1f img/s%s | eta %s",
                         self.iteration, self.args.iters, row["train_loss"],
                         f" (aux {row['train_loss_aux']:.4f})" if row.get("train_loss_aux") is not None else "",
                         fmt(m["mIoU"]), fmt(m["mAcc"]), fmt(m["aAcc"]), row["lr"], row["train_img_per_s"],
                         f" | {bad} bad samples so far" if bad else "", duration(eta))
        barrier(self.info)


def train_segmentation(args) -> int:
    return launch(SegTrainer, args)
