"""OverLoCK (CVPR 2025) for PyTorch and timm: the official models, exact, natten-free and fast.

``import overlock`` registers ``overlock_{xt,t,s,b}`` and their ``_reparam`` deploy forms with timm;
``overlock.fuse(model)`` gives the fast inference form of any of them.
"""
from .weights import CheckpointError, load_into
from .contmix import ContMixBlock, get_backend, set_backend, use_backend
from .fused import fuse
from .models import MODEL_CONFIGS, VARIANTS, OverLoCK, OverLoCKDense, create_dense_backbone
from .segmentation import create_segmentation_model  # also registers timm's dense_overlock_* feature models

__version__ = "0.1.0"

__all__ = [
    "OverLoCK", "OverLoCKDense", "ContMixBlock", "fuse", "create_dense_backbone", "load_into", "CheckpointError",
    "MODEL_CONFIGS", "VARIANTS", "set_backend", "get_backend", "use_backend", "__version__",
    "create_segmentation_model",
]


def create_detection_model(*args, **kwargs):
    """The official Mask R-CNN + OverLoCK on torchvision; see :func:`overlock.detection.create_detection_model`."""
    from .detection import create_detection_model as create
    return create(*args, **kwargs)
