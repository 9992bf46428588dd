"""The run machinery shared by ``overlock train``, ``train-seg`` and ``detect-train``.

Each trainer keeps what is specific to its task (data, model, loss, schedule, evaluation, metric columns); what
makes a run safe to interrupt and to scale lives here once: logging per rank, the output directory and its
refusal to overwrite a run, the resume checks, AMP, the optimisation step with its NaN guards, DDP and SyncBN set-up,
the NaN stop message and the per-step log (``steps.csv``) trimmed back to the resume point.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
from timm.utils import dispatch_clip_grad

from ..errors import UsageError
from ..weights import CheckpointError
from .distributed import DistInfo, all_reduce_sum, cleanup, init_distributed

_logger = logging.getLogger("overlock")


class NonFiniteLoss(RuntimeError):
    """A step met a NaN/Inf loss or gradient; raised before the weights are touched."""


def setup_logging(info: DistInfo) -> None:
    """Messages of the ``overlock`` logger to stderr: all on rank 0, warnings and errors on the other ranks."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s" if info.is_main else f"[rank {info.rank}] %(message)s"))
    _logger.handlers[:] = [handler]
    _logger.setLevel(logging.INFO if info.is_main else logging.WARNING)
    _logger.propagate = False


def launch(trainer_class, args) -> int:
    """Join torchrun's process group (if any), set up logging, build ``trainer_class(args, info)`` and ``fit()``
    it; the exit code. The process group is left on every way out."""
    info = init_distributed(args.device)
    setup_logging(info)
    try:
        return trainer_class(args, info).fit()
    finally:
        cleanup()


def autocast_for(args, device: torch.device):
    """AMP context: float16 + loss scaling on CUDA by default, bfloat16 on CPU (``--amp-dtype`` to choose)."""
    if not args.amp:
        return contextlib.nullcontext, None
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, None: None}[args.amp_dtype]
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def ctx():
        return torch.autocast(device.type, dtype=dtype)
    return ctx, scaler


def prepare_output(args, default_name: str, info: DistInfo) -> str:
    """The run directory: ``--output``, else the resumed checkpoint's folder, else ``output/<name>-<time>``.
    Rank 0 creates it and refuses one that already holds a run unless ``--resume`` is given."""
    if args.output:
        output = args.output
    elif args.resume:
        output = os.path.dirname(os.path.abspath(args.resume))
    else:
        output = os.path.join("output", f"{default_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if info.is_main:
        last = os.path.join(output, "last.pth")
        if not args.resume and os.path.exists(last):
            raise UsageError(f"--output {output} already holds a run (last.pth): continue it with --resume {last} "
                             "or choose another --output")
        os.makedirs(output, exist_ok=True)
    return output


def check_resume(state: Dict, path: str, classes: Sequence[str], model: str, data: str) -> None:
    """A run state fits this run only with the same classes (in order) and the same model; ``data`` names where
    this run's classes come from (``--data-dir``, ``--train-ann FILE``)."""
    theirs = list(state["class_names"])
    if theirs != list(classes):
        raise CheckpointError(f"--resume {path}: trained on {len(theirs)} classes ({', '.join(theirs[:5])} ...) but "
                              f"{data} has {len(classes)} ({', '.join(list(classes)[:5])} ...); resume with the data "
                              "it was trained on")
    if state["args"].get("model") != model:
        raise CheckpointError(f"--resume {path}: a checkpoint of --model {state['args'].get('model')}, not {model}")


def report_changed_args(state: Dict, args, keys: Sequence[str]) -> None:
    """Warn when a resume changes an argument that defines the run (allowed, but no longer the same run)."""
    from .run_state import _plain
    changed = [f"{k}: {state['args'].get(k)} -> {getattr(args, k, None)}" for k in keys
               if _plain(state["args"].get(k)) != _plain(getattr(args, k, None))]
    if changed:
        _logger.warning("--resume: run-defining arguments differ from the checkpoint's (%s); the continuation "
                        "will not equal an uninterrupted run", "; ".join(changed))


def sync_batchnorm(model: nn.Module, info: DistInfo, enabled: bool) -> nn.Module:
    """SyncBatchNorm over the ranks of a CUDA run (it has no CPU kernel: gloo runs keep per-process BN)."""
    if not (enabled and info.distributed):
        return model
    if info.device.type != "cuda":
        _logger.info("SyncBatchNorm needs CUDA: keeping per-process BatchNorm on %s", info.device.type)
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def wrap_ddp(model: nn.Module, info: DistInfo, find_unused: bool = False) -> nn.Module:
    """The module to call in training: DDP over the ranks of a torchrun, the model itself otherwise."""
    if not info.distributed:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def optimize(loss: torch.Tensor, model: nn.Module, optimizer, scaler, info: DistInfo, where: str,
             clip_grad: Optional[float] = None, clip_mode: str = "norm") -> None:
    """One optimisation step: stop (on every rank at once) on a non-finite loss, backward (through the AMP loss
    scaler when there is one), optional clipping, and without a scaler a non-finite-gradient stop before the
    optimizer can write NaN into the weights. ``where`` names the step in the error."""
    finite = bool(torch.isfinite(loss.detach()).item())
    if info.distributed:
        finite = all_reduce_sum([0.0 if finite else 1.0], info)[0] == 0
    if not finite:
        raise NonFiniteLoss(f"loss is {loss.item()} at {where}")
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:  # the scaler skips steps with non-finite gradients itself
        scaler.scale(loss).backward()
        if clip_grad:
            scaler.unscale_(optimizer)
            dispatch_clip_grad(model.parameters(), clip_grad, mode=clip_mode)
        scaler.step(optimizer)
        scaler.update()
        return
    loss.backward()
    # a finite loss can still give non-finite gradients (seen with bfloat16 autocast)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads and not torch.isfinite(torch.stack(torch._foreach_norm(grads))).all():
        raise NonFiniteLoss(f"non-finite gradients (finite loss) at {where}")
    if clip_grad:
        dispatch_clip_grad(model.parameters(), clip_grad, mode=clip_mode)
    optimizer.step()


def nan_stop(err: NonFiniteLoss, output: str, command: str, amp: bool, clip_flag: bool = True,
             logbook=None) -> int:
    """Log why the run stopped and how to continue from the last good checkpoint; the exit code (3)."""
    last = os.path.join(output, "last.pth")
    has_last = os.path.exists(last)
    advice = [f"overlock {command} ... --resume {last}" if has_last else "no checkpoint was written yet: start again"]
    if amp:
        advice.append("without --amp/--native-amp (the official README's advice for NaN losses under AMP)")
    advice.append("with a lower --lr" + (" or with --clip-grad" if clip_flag else ""))
    _logger.error("stopped: %s. Nothing was written after the last good checkpoint%s. Resume: %s",
                  err, f" ({last})" if has_last else "", "; ".join(advice))
    if logbook is not None:
        logbook.close()
    return 3


class StepsLog:
    """``steps.csv``: a row every ``--log-interval`` steps; rows past the resume point (written after the
    checkpoint a kill fell back to) are dropped on start, so a resumed run lists each step once."""

    def __init__(self, path: str, columns: Sequence[str], resume_step: int = 0, step_key: str = "step"):
        self.path = path
        at = list(columns).index(step_key)
        lines = [",".join(columns) + "\n"]
        if os.path.exists(path):
            with open(path) as f:
                lines += [ln for ln in f.readlines()[1:] if ln.strip() and int(ln.split(",")[at]) <= resume_step]
        with open(path, "w") as f:
            f.writelines(lines)

    def append(self, *values) -> None:
        with open(self.path, "a") as f:
            f.write(",".join(map(repr, values)) + "\n")


def duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
