"""Run the official implementation itself, from a checkout of LMMMEng/OverLoCK, for side-by-side measurements.

The official ``models/overlock.py`` cannot be imported as it is on a current stack: it imports
``natten.functional.na2d_av`` (removed from natten >= 0.20) and ``mmengine``, and registers its models under
the same timm names as ours. :func:`load_official_models` imports it with three stand-ins, installed only for
that import and only where the real package is missing:

- ``natten.functional.na2d_av``: the official natten-free fallback of ``models/contmix.py`` (unfold of the
  values, replicate padding, contraction), i.e. our ``unfold`` backend;
- ``mmengine.runner.load_checkpoint``: raises (pretrained loading is not needed to measure speed);
- ``timm.models.registry.register_model``: a no-op, so our registrations stay in place.

:func:`build_official_segmentation_backbone` imports the official mmseg backbone
(``segmentation/models/overlock.py``) the same way, with stand-ins for the mmseg registry and logger and mmcv's
``load_checkpoint`` where those packages are missing.

Nothing of the official code is copied into this project; the user points at their own checkout.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import sys
import types
import warnings

__all__ = ["load_official_models", "build_official_model", "official_overlock_file",
           "build_official_segmentation_backbone"]


def official_overlock_file(repo: str) -> str:
    """Path of ``models/overlock.py`` in a checkout, with an error that says what to pass otherwise."""
    path = os.path.join(os.path.expanduser(repo), "models", "overlock.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: --official-code must be a checkout of "
                                f"https://github.com/LMMMEng/OverLoCK (the folder that contains models/overlock.py)")
    return path


def _stand_ins() -> dict:
    from .ops.neighborhood import na2d_av_unfold

    mods = {}
    try:
        from natten.functional import na2d_av  # noqa: F401
    except ImportError:
        natten = types.ModuleType("natten")
        functional = types.ModuleType("natten.functional")

        def na2d_av(attn, value, kernel_size, dilation=1, **unused):
            if dilation != 1:
                raise NotImplementedError("stand-in na2d_av supports dilation 1 only (all OverLoCK models use 1)")
            return na2d_av_unfold(attn, value, kernel_size)
        functional.na2d_av = na2d_av
        natten.functional = functional
        mods.update({"natten": natten, "natten.functional": functional})
    try:
        from mmengine.runner import load_checkpoint  # noqa: F401
    except ImportError:
        mmengine = types.ModuleType("mmengine")
        runner = types.ModuleType("mmengine.runner")

        def load_checkpoint(*args, **kwargs):
            raise RuntimeError("the official code's pretrained loading needs mmengine; load weights with overlock")
        runner.load_checkpoint = load_checkpoint
        mmengine.runner = runner
        mods.update({"mmengine": mmengine, "mmengine.runner": runner})
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda fn: fn
    mods["timm.models.registry"] = registry
    return mods


@contextlib.contextmanager
def _patched_modules(mods: dict):
    saved = {name: sys.modules.get(name) for name in mods}
    sys.modules.update(mods)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def load_official_models(repo: str) -> types.ModuleType:
    """Import the official ``models/overlock.py`` of ``repo``; its ``overlock_t(...)`` etc. build official models.

    The official layer constructors print to stdout; that output is swallowed. The natten stand-in stays bound
    inside the returned module (it was imported by name), so the module keeps working after the import.
    """
    return _import_file(official_overlock_file(repo), "overlock_official_models", _stand_ins())


def _import_file(path: str, module_name: str, stand_ins: dict) -> types.ModuleType:
    """Import one file of the official code with ``stand_ins`` for packages it imports but we do not need;
    its prints and warnings are swallowed."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    with _patched_modules(stand_ins), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            spec.loader.exec_module(module)
        except ImportError as e:
            raise ImportError(f"importing {path} failed ({e}); the official code also needs einops "
                              f"(pip install einops)") from e
    return module


def build_official_model(repo: str, name: str, **kwargs):
    """An official model by its registered name (``overlock_t`` ...), constructor prints swallowed."""
    return _construct(load_official_models(repo), name, f"a model of the official code in {repo}", kwargs)


def _construct(module: types.ModuleType, name: str, what: str, kwargs: dict):
    """``module.<name>(**kwargs)`` with the constructor's prints and warnings swallowed."""
    fn = getattr(module, name, None)
    if fn is None or not callable(fn):
        raise ValueError(f"{name!r} is not {what} (it has overlock_xt, overlock_t, overlock_s, overlock_b)")
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(**kwargs)


def _mmseg_stand_ins() -> dict:
    """mmseg's ``MODELS`` registry (a decorator that registers nothing), ``get_root_logger`` and mmcv's
    ``load_checkpoint``: what ``segmentation/models/overlock.py`` imports, where mmseg/mmcv are missing."""
    import logging

    mods = {}
    try:
        from mmseg.models.builder import MODELS  # noqa: F401
        from mmseg.utils import get_root_logger  # noqa: F401
    except ImportError:
        class _Registry:
            @staticmethod
            def register_module(*args, **kwargs):
                return args[0] if args and callable(args[0]) else (lambda fn: fn)
        names = ("mmseg", "mmseg.models", "mmseg.models.builder", "mmseg.utils")
        made = {n: types.ModuleType(n) for n in names}
        made["mmseg.models.builder"].MODELS = _Registry()
        made["mmseg.utils"].get_root_logger = lambda *a, **k: logging.getLogger("overlock_official")
        mods.update(made)
    try:
        from mmcv.runner import load_checkpoint  # noqa: F401
    except ImportError:
        mmcv, runner = types.ModuleType("mmcv"), types.ModuleType("mmcv.runner")

        def load_checkpoint(*args, **kwargs):
            raise RuntimeError("the official code's pretrained loading needs mmcv; load weights with overlock")
        runner.load_checkpoint = load_checkpoint
        mmcv.runner = runner
        mods.update({"mmcv": mmcv, "mmcv.runner": runner})
    return mods


def build_official_segmentation_backbone(repo: str, name: str, **kwargs):
    """The official mmseg backbone (``segmentation/models/overlock.py`` of ``repo``) by name, constructor prints
    swallowed; ``out_channels`` is set to the widths of its four maps, as our dense backbones have it."""
    path = os.path.join(os.path.expanduser(repo), "segmentation", "models", "overlock.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: --official-code must be a checkout of "
                                f"https://github.com/LMMMEng/OverLoCK (with its segmentation/ folder)")
    module = _import_file(path, "overlock_official_segmentation", {**_stand_ins(), **_mmseg_stand_ins()})
    model = _construct(module, name, f"a backbone of the official code in {path}", kwargs)
    model.out_channels = [norm.normalized_shape[0] if hasattr(norm, "normalized_shape") else norm.num_features
                          for norm in model.extra_norm]
    return model
