"""Transforms and loaders from timm's pieces, with this package's resumable sampling."""
from __future__ import annotations

from typing import Dict, Optional

import torch
from PIL import Image, ImageOps
from timm.data import auto_augment, create_transform, resolve_data_config

from .folder import ImageFolderSplit, collate_skipping_none
from .sampler import ResumableSampler, ShardSampler


def _posterize(img, bits_to_keep, **_):
    """timm's posterize, for Pillow >= 11: RandAugment's increasing posterize reaches 0 bits, which old Pillow
    turned into a black image and new Pillow rejects (a crash mid-run with the official policy)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


for _name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
    if _name in auto_augment.NAME_TO_OP:
        auto_augment.NAME_TO_OP[_name] = _posterize


def data_config_for(model, img_size: Optional[int] = None, crop_pct: Optional[float] = None) -> Dict:
    """Input size, interpolation, mean/std and crop_pct from the model's pretrained config, with overrides."""
    overrides = {}
    if img_size:
        overrides["img_size"] = img_size
    if crop_pct:
        overrides["crop_pct"] = crop_pct
    return resolve_data_config(overrides, model=model)


def train_transform(cfg: Dict, args):
    """The official ImageNet augmentation (timm): random resized crop, flip, RandAugment, colour jitter,
    random erasing; ``--no-aug`` leaves resize, crop and normalisation only."""
    return create_transform(
        cfg["input_size"], is_training=True, no_aug=args.no_aug, scale=tuple(args.scale), ratio=tuple(args.ratio),
        hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa or None,
        interpolation=args.train_interpolation or cfg["interpolation"], mean=cfg["mean"], std=cfg["std"],
        re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)


def eval_transform(cfg: Dict):
    """Resize by crop_pct (bicubic for OverLoCK), centre crop, normalise: the official evaluation."""
    return create_transform(cfg["input_size"], is_training=False, interpolation=cfg["interpolation"],
                            mean=cfg["mean"], std=cfg["std"], crop_pct=cfg["crop_pct"])


def _loader_kwargs(workers: int, device: torch.device) -> Dict:
    kw = dict(num_workers=workers, pin_memory=device.type == "cuda")
    if workers > 0:
        kw.update(persistent_workers=True, prefetch_factor=4)
    return kw


def train_loader(dataset: ImageFolderSplit, batch_size: int, seed: int, rank: int, world_size: int, workers: int,
                 device: torch.device):
    sampler = ResumableSampler(len(dataset), batch_size, seed=seed, rank=rank, world_size=world_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                                         **_loader_kwargs(workers, device))
    return loader, sampler


def eval_loader(dataset: ImageFolderSplit, batch_size: int, rank: int, world_size: int, workers: int,
                device: torch.device):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size,
                                       sampler=ShardSampler(len(dataset), rank, world_size),
                                       collate_fn=collate_skipping_none, **_loader_kwargs(workers, device))
