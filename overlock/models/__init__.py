"""OverLoCK models: architecture, dense backbones and timm registration."""
from .dense import OverLoCKDense
from .factory import VARIANTS, create_dense_backbone
from .overlock import MODEL_CONFIGS, OverLoCK

__all__ = ["OverLoCK", "OverLoCKDense", "MODEL_CONFIGS", "VARIANTS", "create_dense_backbone"]
