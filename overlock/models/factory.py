"""timm registration, pretrained configs and the dense-backbone factory."""
from __future__ import annotations

import logging
import os
import pickle
import warnings
from typing import Optional

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ..weights import CheckpointError, _strict_load, fit_state_dict, load_into, read_checkpoint, unwrap_state_dict
from .dense import DENSE_KINDS, OverLoCKDense
from .overlock import MODEL_CONFIGS, OverLoCK

__all__ = ["create_dense_backbone", "RELEASE_URL", "VARIANTS", "DENSE_RELEASES", "release_files", "dense_release",
           "download_release", "offline_message", "ReleaseUnavailable"]

_logger = logging.getLogger("overlock")

RELEASE_URL = "https://github.com/LMMMEng/OverLoCK/releases/download/v1/"
VARIANTS = tuple(MODEL_CONFIGS)
CROP_PCT = {"overlock_xt": 0.925, "overlock_t": 0.95, "overlock_s": 0.95, "overlock_b": 0.975}


def _cfg(url: str, **kwargs):
    return {
        "url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.9, "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed1.0", "classifier": "head.4", "custom_load": True,
        "license": "apache-2.0", "paper_ids": "arXiv:2502.20087", **kwargs,
    }


def _release_url(name: str) -> str:
    return f"{RELEASE_URL}{name.replace('_reparam', '')}_in1k_224{'_reparam' if name.endswith('_reparam') else ''}.pth"


# Official dense-prediction release files (detection/readme.md and segmentation/readme.md of the official code):
# Mask R-CNN 1x and 3x on COCO and UperNet 160k on ADE20K, for T, S and B. They load with
# ``create_dense_backbone(variant, kind, checkpoint=download_release(dense_release(variant, kind, schedule)))``.
_SIZE_NAMES = {"overlock_t": "tiny", "overlock_s": "small", "overlock_b": "base"}
DENSE_RELEASES = {
    **{(v, "detection", sched): f"maskrcnn{sched}_overlock_{size}_coco.pth"
       for v, size in _SIZE_NAMES.items() for sched in ("1x", "3x")},
    **{(v, "segmentation", "160k"): f"upernet_overlock_{size}_ade20k.pth" for v, size in _SIZE_NAMES.items()},
}


def release_files() -> dict:
    """Every official release file: name -> URL (ImageNet training and deploy forms, Mask R-CNN, UperNet)."""
    names = [os.path.basename(_release_url(v)) for v in VARIANTS]
    names += [os.path.basename(_release_url(f"{v}_reparam")) for v in VARIANTS]
    names += list(DENSE_RELEASES.values())
    return {n: RELEASE_URL + n for n in names}


def dense_release(variant: str, kind: str = "detection", schedule: Optional[str] = None) -> str:
    """File name of the official ``kind`` checkpoint of ``variant`` (``schedule``: '1x'/'3x' or '160k')."""
    options = {k[2]: n for k, n in DENSE_RELEASES.items() if k[:2] == (variant, kind)}
    if not options:
        raise ValueError(f"no official {kind} release for {variant!r}; there are: "
                         f"{', '.join(sorted({f'{v} {k}' for v, k, _ in DENSE_RELEASES}))}")
    schedule = schedule or next(iter(options))
    if schedule not in options:
        raise ValueError(f"{variant} {kind}: schedule {schedule!r} not released; choose {', '.join(options)}")
    return options[schedule]


def offline_message(name: str, error: BaseException, cache_dir: Optional[str] = None) -> str:
    """What to do when an official file cannot be downloaded: its URL, the cache path and the local-file option."""
    if cache_dir is None:
        from timm.models._hub import get_cache_dir
        cache_dir = get_cache_dir()
    if name.startswith(("maskrcnn", "upernet")):
        variant, kind, _ = next(k for k, n in DENSE_RELEASES.items() if n == name)
        use = f"overlock.create_dense_backbone('{variant}', kind='{kind}', checkpoint='/path/to/{name}')"
    else:
        variant = name.split("_in1k")[0] + ("_reparam" if name.endswith("_reparam.pth") else "")
        use = (f"timm.create_model('{variant}', pretrained=True, "
               f"pretrained_cfg_overlay=dict(file='/path/to/{name}'))")
    return (f"could not download the official file {RELEASE_URL}{name} ({type(error).__name__}: {error}). Without "
            f"network access, download it elsewhere and either copy it to {os.path.join(cache_dir, name)} (the "
            f"cache directory) or pass the local file: {use}")


class ReleaseUnavailable(CheckpointError):
    """An official file that could not be downloaded; the message names the URL and the local-file option."""


def download_release(name: str, cache_dir: Optional[str] = None, progress: bool = True) -> str:
    """Path of the official release file ``name`` in the cache directory (timm's: torch hub ``checkpoints/``),
    downloaded on first use."""
    files = release_files()
    if name not in files:
        raise ValueError(f"{name!r} is not an official OverLoCK release file; the files are: {', '.join(files)}")
    if cache_dir is None:
        from timm.models._hub import get_cache_dir
        cache_dir = get_cache_dir()
    path = os.path.join(cache_dir, name)
    if os.path.isfile(path):
        return path
    import torch.hub
    try:
        os.makedirs(cache_dir, exist_ok=True)
        torch.hub.download_url_to_file(files[name], path, progress=progress)
    except Exception as e:  # noqa: BLE001 - URLError, HTTPError, OSError, ...: re-raised with what to do
        raise ReleaseUnavailable(offline_message(name, e, cache_dir)) from e
    return path


# Tiny configuration (that of the reference data) for fast tests of training code, like timm's test_* models.
TEST_CONFIG = dict(MODEL_CONFIGS["overlock_xt"], depth=(1, 1, 1, 1), sub_depth=(2, 1), embed_dim=(16, 32, 64, 96),
                   sub_num_heads=(2, 2), projection=64)

default_cfgs = generate_default_cfgs({
    "test_overlock.untrained": _cfg("", input_size=(3, 64, 64), pool_size=(2, 2), crop_pct=0.875),
    **{f"{v}.in1k": _cfg(_release_url(v), crop_pct=CROP_PCT[v]) for v in VARIANTS},
    **{f"{v}_reparam.in1k": _cfg(_release_url(f"{v}_reparam"), crop_pct=CROP_PCT[v]) for v in VARIANTS},
})


class _TimmOverLoCK(OverLoCK):
    """OverLoCK as built by timm: ``load_pretrained`` reads official files safely (timm ``custom_load``)."""

    def load_pretrained(self, path: str) -> None:
        load_into(self, path)


def _filter_fn(state_dict, model):
    """timm's path for local files (read weights-only by timm): fit official keys to the model."""
    return fit_state_dict(unwrap_state_dict(state_dict, "pretrained file"), model, "pretrained file")


def _create(variant: str, pretrained: bool = False, fuse: Optional[bool] = None, **kwargs) -> OverLoCK:
    """Build (and load) a model; ``_reparam`` variants come fused for inference unless ``fuse=False``
    (``fuse=False`` gives the official deploy form, whose state dict is that of the official deploy files)."""
    deploy = variant.endswith("_reparam")
    model = _build(variant, pretrained, **kwargs)
    if deploy if fuse is None else fuse:
        from ..fused import fuse as fuse_model
        model = fuse_model(model, inplace=True)
    return model


def _build(variant: str, pretrained: bool, **kwargs) -> OverLoCK:
    deploy = variant.endswith("_reparam")
    base = variant[:-len("_reparam")] if deploy else variant
    args = dict(TEST_CONFIG if base == "test_overlock" else MODEL_CONFIGS[base])
    args.update(kwargs)
    args.setdefault("deploy", deploy)
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if pretrained and overlay.get("file") and not os.path.isfile(overlay["file"]):
        raise FileNotFoundError(f"pretrained_cfg_overlay file not found: {overlay['file']}")
    try:
        return build_model_with_cfg(
            _TimmOverLoCK, variant, pretrained,
            pretrained_filter_fn=_filter_fn,
            feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
            **args)
    except (pickle.UnpicklingError, RuntimeError) as e:
        if isinstance(e, CheckpointError) or not (pretrained and "pickle" in str(e)):
            raise
        raise CheckpointError(f"{overlay.get('file', variant)}: refused to unpickle objects other than tensors ({e}). "
                              "If you trust the file, re-save only its tensors: "
                              "torch.save(obj['state_dict'], 'clean.pth')") from e
    except OSError as e:
        if not pretrained or overlay.get("file") or isinstance(e, FileNotFoundError):
            raise
        raise RuntimeError(offline_message(os.path.basename(_release_url(variant)), e)) from e


@register_model
def overlock_xt(pretrained: bool = False, **kwargs) -> OverLoCK:
    return _create("overlock_xt", pretrained, **kwargs)


@register_model
def overlock_t(pretrained: bool = False, **kwargs) -> OverLoCK:
    return _create("overlock_t", pretrained, **kwargs)


@register_model
def overlock_s(pretrained: bool = False, **kwargs) -> OverLoCK:
    return _create("overlock_s", pretrained, **kwargs)


@register_model
def overlock_b(pretrained: bool = False, **kwargs) -> OverLoCK:
    return _create("overlock_b", pretrained, **kwargs)


@register_model
def overlock_xt_reparam(pretrained: bool = False, **kwargs) -> OverLoCK:
    return _create("overlock_xt_reparam", pretrained, **kwargs)


@register_model
def overlock_t_reparam(pretrained: bool = False, **kwargs) -> OverLoCK:
    return _create("overlock_t_reparam", pretrained, **kwargs)


@register_model
def overlock_s_reparam(pretrained: bool = False, **kwargs) -> OverLoCK:
    return _create("overlock_s_reparam", pretrained, **kwargs)


@register_model
def overlock_b_reparam(pretrained: bool = False, **kwargs) -> OverLoCK:
    return _create("overlock_b_reparam", pretrained, **kwargs)


@register_model
def test_overlock(pretrained: bool = False, **kwargs) -> OverLoCK:
    """A 0.7 M-parameter OverLoCK for tests and smoke runs (no weights)."""
    return _create("test_overlock", pretrained, **kwargs)


def create_dense_backbone(name: str, kind: str = "detection", checkpoint: Optional[str] = None,
                          **kwargs) -> OverLoCKDense:
    """Backbone of the official Mask R-CNN (``kind="detection"``) or UperNet (``"segmentation"``) models.

    ``checkpoint`` may be an official detection/segmentation checkpoint (its ``backbone.`` keys load strictly;
    neck and head keys are ignored) or an ImageNet classification checkpoint (heads dropped; the dense-only
    layers ``extra_norm``/``h_proj`` start fresh and are listed in a warning). The result's ``out_channels``
    gives the channels of its four outputs (strides 4, 8, 16, 32).
    """
    deploy = name.endswith("_reparam")
    base = name[:-len("_reparam")] if deploy else name
    if base not in MODEL_CONFIGS and base != "test_overlock":
        raise ValueError(f"unknown OverLoCK variant {name!r}; choose one of {', '.join(VARIANTS)}")
    if kind not in DENSE_KINDS:
        raise ValueError(f"kind must be one of {DENSE_KINDS}, got {kind!r}")
    args = dict(TEST_CONFIG if base == "test_overlock" else MODEL_CONFIGS[base])
    args.update(kwargs)
    args.setdefault("deploy", deploy)
    model = OverLoCKDense(kind=kind, **args)
    if checkpoint is not None:
        load_dense_checkpoint(model, checkpoint)
    return model


def load_dense_checkpoint(model: OverLoCKDense, checkpoint) -> OverLoCKDense:
    source = os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "state dict"
    obj = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    state = unwrap_state_dict(obj, source, prefer_ema=False)
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if backbone:
        state = fit_state_dict(backbone, model, source, classifiers=())
        _strict_load(model, state, source)
        return model
    if any(k.startswith("extra_norm.") for k in state):  # a bare backbone state dict
        _strict_load(model, fit_state_dict(state, model, source, classifiers=()), source)
        return model
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "aux_head."))}
    if not any(k.startswith("patch_embed1.") for k in state):
        raise CheckpointError(f"{source}: neither an OverLoCK classification checkpoint nor a detection/"
                              "segmentation checkpoint with 'backbone.' keys")
    state = fit_state_dict(state, model, source, classifiers=())
    fresh_prefixes = ("extra_norm.", "h_proj.")
    fresh = _strict_load(model, state, source, allow_missing=fresh_prefixes)
    warnings.warn(f"{source}: classification checkpoint loaded into the {model.kind} backbone; task-specific "
                  f"layers initialised fresh: {', '.join(sorted({k.rsplit('.', 1)[0] for k in fresh}))}",
                  stacklevel=2)
    return model
