"""Semantic segmentation: the official UperNet + OverLoCK models, inference, training data and metrics."""
from .model import OverLoCKUperNet, create_segmentation_model, load_segmentation_checkpoint
from .heads import FCNHead, UPerHead
from . import timm_dense  # noqa: F401 - registers the dense features-only variants with timm

__all__ = ["OverLoCKUperNet", "create_segmentation_model", "load_segmentation_checkpoint", "UPerHead", "FCNHead"]
