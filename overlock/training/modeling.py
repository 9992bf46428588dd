"""Models for the command line: timm creation with the OverLoCK options, weights from any checkpoint form."""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import timm
import torch

from ..commands.argtypes import positive_int, probability
from ..errors import UsageError
from ..weights import CheckpointError, load_into, read_checkpoint, unwrap_state_dict
from .run_state import is_run_checkpoint

_logger = logging.getLogger("overlock")


def is_overlock(name: str) -> bool:
    return name.split(".")[0].startswith(("overlock_", "test_overlock"))


def weights_of(obj: Dict, source: str, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The state dict inside a project run checkpoint (model or EMA) or an official/timm checkpoint."""
    if is_run_checkpoint(obj):
        key = "model_ema" if use_ema else "model"
        if not obj.get(key):
            raise CheckpointError(f"{source}: this run checkpoint has no EMA weights (trained without --model-ema); "
                                  "drop --use-ema")
        return obj[key]
    return unwrap_state_dict(obj, source, prefer_ema=True)


CLASSIFIER_KEYS = ("head.4.weight", "head.weight", "head.fc.weight")  # OverLoCK, then common timm heads


def class_count(state: Dict[str, torch.Tensor]) -> Optional[int]:
    """Number of classes of a state dict's classifier, None without one."""
    key = next((k for k in CLASSIFIER_KEYS if k in state), None)
    return None if key is None else int(state[key].shape[0])


def check_class_count(source: str, state: Dict[str, torch.Tensor], num_classes: int) -> None:
    """The one class-count check: refuse, before any compute, weights that classify another number of classes."""
    n = class_count(state)
    if n is not None and n != num_classes:
        raise CheckpointError(f"{source}: the checkpoint classifies {n} classes but the data set has {num_classes}; "
                              "fine-tune from it with --pretrained-path (fresh classifier), or use a checkpoint "
                              "trained on these classes")


def checkpoint_classes(obj: Dict, source: str) -> Tuple[int, Optional[List[str]]]:
    """Class count (from the classifier) and class names (run checkpoints only) of a checkpoint."""
    n = class_count(weights_of(obj, source))
    if n is None:
        raise CheckpointError(f"{source}: no classifier weights ({', '.join(CLASSIFIER_KEYS)}): not a "
                              "classification checkpoint")
    return n, obj.get("class_names") if is_run_checkpoint(obj) else None


def create_model(name: str, num_classes: int, *, pretrained: bool = False, pretrained_path: Optional[str] = None,
                 drop_path: Optional[float] = None, aux_head: bool = False, ckpt_stg=None,
                 grad_checkpoint: bool = False, **kwargs) -> torch.nn.Module:
    """``timm.create_model`` with the OverLoCK training options.

    ``grad_checkpoint`` with all-zero ``ckpt_stg`` checkpoints every block (timm's meaning); non-zero
    ``ckpt_stg`` keeps the official meaning (blocks per stage).
    """
    overlock_kwargs = {}
    if is_overlock(name):
        overlock_kwargs["use_ds"] = aux_head
        overlock_kwargs["fuse"] = False  # the exact form: weights load into it; inference fuses afterwards
        if grad_checkpoint and ckpt_stg and any(ckpt_stg):
            overlock_kwargs["use_checkpoint"] = list(ckpt_stg)
    if drop_path is not None:
        kwargs["drop_path_rate"] = drop_path
    if pretrained_path:
        kwargs["pretrained_cfg_overlay"] = dict(file=pretrained_path)
    try:
        model = timm.create_model(name, pretrained=pretrained or bool(pretrained_path), num_classes=num_classes,
                                  **overlock_kwargs, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e) or "Unknown model" in repr(e):
            raise UsageError(f"--model {name}: unknown model; OverLoCK models are "
                             "overlock_{xt,t,s,b}[_reparam] (any timm model name works too)") from e
        raise
    if grad_checkpoint and not overlock_kwargs.get("use_checkpoint"):
        model.set_grad_checkpointing(True)
    return model


def load_weights(model: torch.nn.Module, path: str, flag: str, num_classes: int, use_ema: bool = False) -> None:
    """Load a project or official checkpoint strictly, refusing a different class count."""
    obj = read_checkpoint(path)
    state = weights_of(obj, f"{flag} {path}", use_ema)
    check_class_count(f"{flag} {path}", state, num_classes)
    if hasattr(model, "forward_aux_head"):  # OverLoCK: official key forms, aux head and deploy merging handled
        load_into(model, state, source=f"{flag} {path}")
    else:
        model.load_state_dict(state)


def add_weight_arguments(p) -> None:
    """Flags shared by ``validate`` and ``predict`` to choose a model and its weights."""
    p.add_argument("--model", default=None, help="model name (default: the one a project checkpoint was trained as)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", default=None, metavar="FILE",
                     help="a project checkpoint (best.pth, last.pth) or an official/timm checkpoint file")
    src.add_argument("--pretrained", action="store_true", help="the official ImageNet weights (download)")
    src.add_argument("--pretrained-path", default=None, metavar="FILE", help="a local official checkpoint file")
    p.add_argument("--use-ema", action="store_true", help="the EMA weights of a project checkpoint")
    p.add_argument("--reparam", action="store_true",
                   help="official flag, always on: inference runs the fused deploy form (same function, faster)")
    p.add_argument("--img-size", type=positive_int, default=None, metavar="N")
    p.add_argument("--crop-pct", type=probability, default=None)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--amp", "--native-amp", dest="amp", action="store_true", help="mixed precision")
    p.add_argument("--amp-dtype", default=None, choices=["float16", "bfloat16"])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")


def model_for_inference(args, device: torch.device):
    """(eval-mode model, class names or None, data config) from the flags of ``add_weight_arguments``."""
    from timm.utils import reparameterize_model

    from ..data.loaders import data_config_for

    obj, run_args, names = None, {}, None
    if args.checkpoint:
        obj = read_checkpoint(args.checkpoint)
        num_classes, names = checkpoint_classes(obj, f"--checkpoint {args.checkpoint}")
        run_args = obj.get("args", {}) if is_run_checkpoint(obj) else {}
    else:
        if not (args.pretrained or args.pretrained_path):
            raise UsageError("choose the weights: --checkpoint FILE, --pretrained or --pretrained-path FILE")
        num_classes = 1000
    name = args.model or run_args.get("model")
    if not name:
        raise UsageError(f"--checkpoint {args.checkpoint}: not a project checkpoint, so the model is unknown: "
                         "pass --model (e.g. overlock_t, or overlock_t_reparam for a deploy-form file)")
    model = create_model(name, num_classes, pretrained=args.pretrained, pretrained_path=args.pretrained_path)
    if obj is not None:
        state = weights_of(obj, f"--checkpoint {args.checkpoint}", args.use_ema)
        if hasattr(model, "forward_aux_head"):
            load_into(model, state, source=f"--checkpoint {args.checkpoint}")
        else:
            model.load_state_dict(state)
    model = reparameterize_model(model.eval())  # the fused inference form (deploy form, BatchNorm folded)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    cfg = data_config_for(model, args.img_size or run_args.get("img_size"),
                          args.crop_pct or run_args.get("crop_pct"))
    return model, names, cfg
