"""``overlock train``: the official timm recipe, resumable to the step, single process or torchrun."""
from __future__ import annotations

import logging
import os
import time
from typing import Dict, Optional

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from tqdm import tqdm

from ..errors import UsageError
from ..fused import fuse
from ..weights import read_checkpoint
from ..data import DataError, ImageFolderSplit, check_image_folder, find_classes
from ..data.folder import resolve_split, sample_seed, seed_everything
from ..data.loaders import data_config_for, eval_transform, train_loader, eval_loader, train_transform
from . import run_state as ckpt
from .distributed import DistInfo, all_reduce_sum, barrier
from .evaluate import evaluate
from .logbook import Logbook
from .run import (NonFiniteLoss, StepsLog, autocast_for, check_resume, duration, launch, nan_stop, optimize,
                  prepare_output, report_changed_args, sync_batchnorm, wrap_ddp)
from .modeling import check_class_count, create_model, load_weights, weights_of
from .optim import fused_kwargs

_logger = logging.getLogger("overlock")

# arguments that define a run: a resume with other values is allowed but reported
RUN_DEFINING = ("model", "batch_size", "lr", "epochs", "seed", "world_size", "img_size", "aux_loss_ratio")
STEP_COLUMNS = ("epoch", "batch", "step", "loss", "loss_aux", "lr")


def _preflight(args, info: DistInfo):
    """Every check that can fail without compute: data layout, classes, checkpoints, batch size."""
    if os.path.isdir(args.data_dir):
        args.val_split = resolve_split(args.data_dir, args.val_split)
    splits = check_image_folder(args.data_dir, (args.train_split, args.val_split))
    classes = find_classes(os.path.join(args.data_dir, args.train_split))
    if args.num_classes and args.num_classes != len(classes):
        raise DataError(f"--num-classes {args.num_classes} but {os.path.join(args.data_dir, args.train_split)} has "
                        f"{len(classes)} class folders; drop --num-classes (it is read from the data)")
    resume = None
    if args.resume:
        resume = ckpt.read_run_checkpoint(args.resume)
        check_resume(resume, args.resume, classes, args.model, "--data-dir")
    if args.initial_checkpoint:
        source = f"--initial-checkpoint {args.initial_checkpoint}"
        check_class_count(source, weights_of(read_checkpoint(args.initial_checkpoint), source), len(classes))
    mixup_on = args.mixup > 0 or args.cutmix > 0
    if mixup_on and args.batch_size % 2:
        raise UsageError(f"-b/--batch-size {args.batch_size}: mixup/cutmix need an even batch size per process "
                         "(or pass --mixup 0 --cutmix 0)")
    if len(splits[args.train_split]) < args.batch_size * info.world_size:
        raise DataError(f"{os.path.join(args.data_dir, args.train_split)}: {len(splits[args.train_split])} images, "
                        f"fewer than one batch ({args.batch_size} x {info.world_size} processes); lower --batch-size")
    return splits, classes, resume


class Trainer:
    """Owns the model, optimizer, schedule and data of one run; ``fit()`` trains to the last epoch."""

    def __init__(self, args, info: DistInfo):
        self.args, self.info = args, info
        splits, self.classes, resume = _preflight(args, info)
        self.output = prepare_output(args, args.model, info)
        args.world_size = info.world_size
        seed_everything(args.seed + info.rank)

        num_classes = len(self.classes)
        self.use_aux = args.aux_loss_ratio > 0
        self.model = create_model(args.model, num_classes, pretrained=args.pretrained,
                                  pretrained_path=args.pretrained_path, drop_path=args.drop_path,
                                  aux_head=self.use_aux, ckpt_stg=args.ckpt_stg, grad_checkpoint=args.grad_checkpoint)
        if self.use_aux and not hasattr(self.model, "forward_aux_head"):
            _logger.info("%s has no auxiliary head: training without deep supervision", args.model)
            self.use_aux = False
        if args.initial_checkpoint:
            load_weights(self.model, args.initial_checkpoint, "--initial-checkpoint", num_classes)
        self.model.to(info.device)
        if args.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.model = sync_batchnorm(self.model, info, args.sync_bn)

        if args.auto_lr:
            args.lr = args.batch_size * info.world_size / 1024 * 1e-3
        self.optimizer = create_optimizer_v2(self.model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                             **({"eps": args.opt_eps} if args.opt_eps else {}),
                                             **fused_kwargs(self.model.parameters(), args.opt))
        self.autocast, self.scaler = autocast_for(args, info.device)
        self.ema = ModelEmaV3(self.model, decay=args.model_ema_decay,
                              device="cpu" if args.model_ema_force_cpu else None) if args.model_ema else None

        # data
        cfg = data_config_for(self.model, args.img_size, args.crop_pct)
        self.data_config = cfg
        bad_log = os.path.join(self.output, "bad_images.txt") if info.is_main else None
        self.train_set = ImageFolderSplit(splits[args.train_split], self.classes, train_transform(cfg, args),
                                          replace_bad=True, bad_log=bad_log)
        self.val_set = ImageFolderSplit(splits[args.val_split], self.classes, eval_transform(cfg),
                                        replace_bad=False, bad_log=bad_log)
        self.loader, self.sampler = train_loader(self.train_set, args.batch_size, args.seed, info.rank,
                                                 info.world_size, args.workers, info.device)
        self.val_loader = eval_loader(self.val_set, args.validation_batch_size or args.batch_size, info.rank,
                                      info.world_size, args.workers, info.device)
        self.steps_per_epoch = self.sampler.batches_per_epoch

        self.scheduler, self.num_epochs = create_scheduler_v2(
            self.optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
            warmup_lr=args.warmup_lr, min_lr=args.min_lr, cooldown_epochs=args.cooldown_epochs,
            step_on_epochs=not args.sched_on_updates, updates_per_epoch=self.steps_per_epoch)

        mixup_on = args.mixup > 0 or args.cutmix > 0
        self.mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                           switch_prob=args.mixup_switch_prob, mode="batch", label_smoothing=args.smoothing,
                           num_classes=num_classes) if mixup_on else None
        self.loss_fn = SoftTargetCrossEntropy() if mixup_on else nn.CrossEntropyLoss(label_smoothing=args.smoothing)

        self.epoch, self.batch, self.step = 0, 0, 0
        self.best = {"top1": None, "epoch": None, "ema_top1": None, "ema_epoch": None}
        self.epoch_sums = _new_epoch_sums()  # the epoch's running loss sums: saved, so a resume continues them
        if resume is not None:
            self._restore(resume)
        self.net = wrap_ddp(self.model, info)
        self.logbook = Logbook(self.output, resume_step=self.step) if info.is_main else None
        self.steps_log = StepsLog(os.path.join(self.output, "steps.csv"), STEP_COLUMNS, self.step) \
            if info.is_main else None

    # ----------------------------------------------------------------------------------------------- state
    def _restore(self, state: Dict) -> None:
        args = self.args
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            if state.get("model_ema"):
                self.ema.module.load_state_dict(state["model_ema"])
            else:
                _logger.warning("--resume: the checkpoint has no EMA weights; EMA starts from the current model")
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batch, self.step = state["epoch"], state["batch"], state["step"]
        self.best = dict(self.best, **state.get("best", {}))
        self.epoch_sums = dict(_new_epoch_sums(), **(state.get("epoch_sums") or {}))
        self.train_set.bad_count.value = int(self.epoch_sums["bad_images"])
        ckpt.set_rng_state(state["rng"])
        report_changed_args(state, args, RUN_DEFINING)
        _logger.info("resuming %s at epoch %d, batch %d (step %d)", args.resume, self.epoch, self.batch, self.step)

    def _state(self, metric: Optional[Dict] = None) -> Dict:
        return ckpt.training_state(model=self.model, model_ema=self.ema, optimizer=self.optimizer,
                                   scheduler=self.scheduler, scaler=self.scaler, epoch=self.epoch, batch=self.batch,
                                   step=self.step, args=self.args, classes=self.classes, best=self.best,
                                   metric=metric, epoch_sums=dict(self.epoch_sums, bad_images=self._bad_images()))

    def save(self, name: str = "last.pth", metric: Optional[Dict] = None) -> Optional[str]:
        if not self.info.is_main:
            return None
        path = os.path.join(self.output, name)
        ckpt.atomic_save(self._state(metric), path)
        return path

    def _bad_images(self) -> int:
        """Unreadable images met in this epoch by this process (training and validation)."""
        return self.train_set.bad_count.value + self.val_set.bad_count.value

    # ----------------------------------------------------------------------------------------------- steps
    def _lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train_step(self, images: torch.Tensor, targets: torch.Tensor):
        args, info = self.args, self.info
        # every random choice of a step (mixup, drop path) depends only on (seed, epoch, batch, rank)
        seed_everything(sample_seed(args.seed + 1, self.epoch, self.batch * info.world_size + info.rank))
        images = images.to(info.device, non_blocking=True)
        targets = targets.to(info.device, non_blocking=True)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            if self.use_aux:
                logits, aux = self.net(images, return_aux=True)
                loss_main = self.loss_fn(logits, targets)
                loss_aux = self.loss_fn(aux, targets)
                loss = loss_main + args.aux_loss_ratio * loss_aux
            else:
                loss_main = loss = self.loss_fn(self.net(images), targets)
                loss_aux = None
        optimize(loss, self.model, self.optimizer, self.scaler, info,
                 f"epoch {self.epoch}, batch {self.batch} (step {self.step + 1})", args.clip_grad, args.clip_mode)
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        self.step += 1
        self.batch += 1
        if args.sched_on_updates:
            self.scheduler.step_update(self.step)
        return loss_main.item(), (loss_aux.item() if loss_aux is not None else None)

    def train_epoch(self) -> Dict[str, float]:
        args, info = self.args, self.info
        if self.batch >= self.steps_per_epoch:
            return {}
        self.sampler.set_epoch(self.epoch, self.batch)
        if not args.sched_on_updates:
            self.scheduler.step(self.epoch)
        else:
            self.scheduler.step_update(self.step)
        self.model.train()
        if self.batch == 0:
            self.epoch_sums = _new_epoch_sums()
            self.train_set.bad_count.value = self.val_set.bad_count.value = 0
        sums = self.epoch_sums
        start = time.perf_counter()
        bar = tqdm(self.loader, total=self.steps_per_epoch, initial=self.batch, disable=None if info.is_main else True,
                   desc=f"epoch {self.epoch + 1}/{self.num_epochs}", unit="batch", dynamic_ncols=True, leave=False)
        images_seen = 0
        for images, targets in bar:
            loss, loss_aux = self.train_step(images, targets)
            images_seen += images.shape[0] * info.world_size
            sums["loss"] += loss
            sums["loss_aux"] += loss_aux or 0.0
            sums["steps"] += 1
            rate = images_seen / (time.perf_counter() - start)
            if info.is_main:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self._lr():.2e}", img_s=f"{rate:.1f}")
                if self.step % args.log_interval == 0:
                    self.steps_log.append(self.epoch, self.batch, self.step, loss, loss_aux, self._lr())
            if args.checkpoint_every and self.step % args.checkpoint_every == 0 and self.batch < self.steps_per_epoch:
                self.save()
        bar.close()
        elapsed = time.perf_counter() - start
        n = max(sums["steps"], 1)
        return {"train_loss": sums["loss"] / n, "train_loss_aux": sums["loss_aux"] / n if self.use_aux else None,
                "epoch_time_s": elapsed, "train_img_per_s": images_seen / max(elapsed, 1e-9)}

    def validate(self) -> Dict[str, float]:
        args = self.args
        out = {}
        if (self.epoch + 1) % max(args.val_freq, 1) and self.epoch + 1 != self.num_epochs:
            return out
        # the fused inference form (BatchNorm folded once): the same function as model.eval(), faster
        m = evaluate(fuse(self.model), self.val_loader, self.info, self.autocast, args.channels_last, desc="val")
        out.update(val_loss=m["loss"], val_top1=m["top1"], val_top5=m["top5"])
        if self.ema is not None:
            m = evaluate(fuse(self.ema.module), self.val_loader, self.info, self.autocast, args.channels_last,
                         desc="val ema")
            out.update(ema_val_loss=m["loss"], ema_val_top1=m["top1"], ema_val_top5=m["top5"])
        return out

    # ----------------------------------------------------------------------------------------------- loop
    def fit(self) -> int:
        args, info = self.args, self.info
        run_start, first_epoch = time.perf_counter(), self.epoch
        if info.is_main:
            n_params = sum(p.numel() for p in self.model.parameters())
            _logger.info("%s: %.2f M parameters, %d classes, %d train / %d val images, %d x %d process(es) per step, "
                         "lr %.3g, %d epochs (%d steps each) -> %s", args.model, n_params / 1e6, len(self.classes),
                         len(self.train_set), len(self.val_set), args.batch_size, info.world_size, args.lr,
                         self.num_epochs, self.steps_per_epoch, self.output)
        while self.epoch < self.num_epochs:
            try:
                train_metrics = self.train_epoch()
            except NonFiniteLoss as e:
                return nan_stop(e, self.output, "train", args.amp, logbook=self.logbook)
            val_metrics = self.validate()
            bad = int(all_reduce_sum([self._bad_images()], info)[0])
            row = {"epoch": self.epoch, "step": self.step, "lr": self._lr(), **train_metrics, **val_metrics,
                   "bad_images": bad}
            improved = []
            for key, best_key, epoch_key in (("val_top1", "top1", "epoch"), ("ema_val_top1", "ema_top1", "ema_epoch")):
                value = val_metrics.get(key)
                if value is not None and (self.best[best_key] is None or value > self.best[best_key]):
                    self.best[best_key], self.best[epoch_key] = value, self.epoch
                    improved.append(best_key)
            self.epoch, self.batch = self.epoch + 1, 0
            if info.is_main:
                self.logbook.append(row)
                self.save("last.pth", metric=val_metrics)
                if "top1" in improved:
                    self.save("best.pth", metric=val_metrics)
                if "ema_top1" in improved:
                    self.save("best_ema.pth", metric=val_metrics)
                done = self.epoch - first_epoch
                eta = (time.perf_counter() - run_start) / done * (self.num_epochs - self.epoch)
                _logger.info(self._epoch_line(row, eta))
            barrier(info)
        if info.is_main:
            self.logbook.close()
            files = "checkpoints, metrics.csv and curves.png" if os.path.exists(self.logbook.png_path) else \
                "checkpoints and metrics.csv (no curves.png: pip install 'overlock[train]' for matplotlib)"
            _logger.info("done: best top-1 %s%s; %s in %s", _fmt(self.best["top1"]),
                         f" (EMA {_fmt(self.best['ema_top1'])})" if self.ema else "", files, self.output)
        return 0

    def _epoch_line(self, row: Dict, eta: float) -> str:
        parts = [f"epoch {row['epoch'] + 1}/{self.num_epochs}"]
        if row.get("train_loss") is not None:
            parts.append(f"loss {row['train_loss']:.4f}" +
                         (f" (aux {row['train_loss_aux']:.4f})" if row.get("train_loss_aux") is not None else ""))
        if row.get("val_top1") is not None:
            parts.append(f"val top-1 {row['val_top1']:.2f} top-5 {row['val_top5']:.2f} loss {row['val_loss']:.4f}")
        if row.get("ema_val_top1") is not None:
            parts.append(f"EMA top-1 {row['ema_val_top1']:.2f}")
        parts.append(f"lr {row['lr']:.2e}")
        if row.get("train_img_per_s"):
            parts.append(f"{row['train_img_per_s']:.1f} img/s, {row['epoch_time_s']:.0f} s")
        if row.get("bad_images"):
            parts.append(f"{row['bad_images']} unreadable images")
        parts.append(f"eta {duration(eta)}")
        return " | ".join(parts)


def _new_epoch_sums() -> Dict[str, float]:
    return {"loss": 0.0, "loss_aux": 0.0, "steps": 0, "bad_images": 0}


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def train(args) -> int:
    return launch(Trainer, args)
