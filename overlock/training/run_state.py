"""Run state (resume checkpoints): the full training state, written atomically, read back weights-only.

A run directory holds ``last.pth`` (written every epoch and every ``--checkpoint-every`` steps), ``best.pth``
(best validation top-1 of the model) and, with EMA, ``best_ema.pth``. Each is the whole state (model, EMA,
optimizer, scheduler, AMP scaler, epoch, step, arguments, class names, RNG states) in plain containers and
tensors only, so ``torch.load(weights_only=True)`` reads it and a resumed run continues exactly.
"""
from __future__ import annotations

import os
import random
import tempfile
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..weights import CheckpointError, read_checkpoint

FORMAT = "overlock-run-v1"


def _plain(value):
    """Arguments as plain, weights-only-loadable values."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], npst[1].numpy().astype(np.uint32), npst[2], npst[3], npst[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Dict[str, Any], path: str) -> None:
    """Write to a temporary file in the same directory, fsync, then rename: a kill never leaves half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pth", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def training_state(*, model, model_ema, optimizer, scheduler, scaler, epoch: int, batch: int, step: int, args,
                   classes, best: Dict[str, Any], metric: Optional[Dict[str, float]] = None,
                   epoch_sums: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
    """Everything a resumed run needs; ``epoch``/``batch`` name the next batch to train, ``epoch_sums`` holds the
    epoch's running loss sums so far (so the epoch's mean loss after a resume equals an uninterrupted run's)."""
    return {
        "format": FORMAT,
        "model": model.state_dict(),
        "model_ema": model_ema.module.state_dict() if model_ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "batch": batch,
        "step": step,
        "args": _plain(vars(args)),
        "class_names": list(classes),
        "best": _plain(best),
        "metric": _plain(metric or {}),
        "epoch_sums": _plain(epoch_sums or {}),
        "rng": rng_state(),
    }


def is_run_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def read_run_checkpoint(path: str) -> Dict[str, Any]:
    obj = read_checkpoint(path)
    if not is_run_checkpoint(obj):
        raise CheckpointError(f"--resume {path}: not an overlock training checkpoint (no '{FORMAT}' marker). To start "
                              "from other weights use --initial-checkpoint (same classes) or --pretrained-path "
                              "(fine-tuning)")
    return obj
