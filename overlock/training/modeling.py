"""Models for the command line: timm creation with the OverLoCK options, weights from any checkpoint form."""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import timm
import torch

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


def checkpoint_classes(obj: Dict, source: str) -> Tuple[int, Optional[List[str]]]:
    """Class count (from the classifier) and class names (run checkpoints only) of a checkpoint."""
    state = weights_of(obj, source)
    weight = state.get("head.4.weight")
    if weight is None:
        raise CheckpointError(f"{source}: no classifier weights 'head.4.weight': not an OverLoCK classification "
                              "checkpoint")
    names = obj.get("class_names") if is_run_checkpoint(obj) else None
    return int(weight.shape[0]), names


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
            raise SystemExit(f"--model {name}: unknown model; OverLoCK models are "
                             "overlock_{xt,t,s,b}[_reparam] (any timm model name works too)") from e
        raise
    if grad_checkpoint and not overlock_kwargs.get("use_checkpoint"):
        model.set_grad_checkpointing(True)
    return model


def load_weights(model: torch.nn.Module, path: str, flag: str, num_classes: int, use_ema: bool = False) -> None:
    """Load a project or official checkpoint strictly, refusing a different class count up front."""
    obj = read_checkpoint(path)
    state = weights_of(obj, f"{flag} {path}", use_ema)
    weight = state.get("head.4.weight", state.get("head.weight", state.get("head.fc.weight")))
    if weight is not None and weight.shape[0] != num_classes:
        raise CheckpointError(f"{flag} {path}: the checkpoint classifies {weight.shape[0]} classes but "
                              f"{num_classes} are expected here; fine-tune from it with --pretrained-path "
                              "(fresh classifier), or use a checkpoint trained on these classes")
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
    p.add_argument("--reparam", action="store_true", help="run the re-parameterized deploy form")
    p.add_argument("--img-size", type=int, default=None, metavar="N")
    p.add_argument("--crop-pct", type=float, default=None)
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
            raise SystemExit("choose the weights: --checkpoint FILE, --pretrained or --pretrained-path FILE")
        num_classes = 1000
    name = args.model or run_args.get("model")
    if not name:
        raise SystemExit(f"--checkpoint {args.checkpoint}: not a project checkpoint, so the model is unknown: "
                         "pass --model (e.g. overlock_t, or overlock_t_reparam for a deploy-form file)")
    model = create_model(name, num_classes, pretrained=args.pretrained, pretrained_path=args.pretrained_path)
    if obj is not None:
        state = weights_of(obj, f"--checkpoint {args.checkpoint}", args.use_ema)
        if hasattr(model, "forward_aux_head"):
            load_into(model, state, source=f"--checkpoint {args.checkpoint}")
        else:
            model.load_state_dict(state)
    if args.reparam:
        model = reparameterize_model(model)
    model.eval().to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    cfg = data_config_for(model, args.img_size or run_args.get("img_size"),
                          args.crop_pct or run_args.get("crop_pct"))
    return model, names, cfg
