"""Object detection and instance segmentation: the official Mask R-CNN + OverLoCK on torchvision."""
from .build import COCO_CLASSES, create_detection_model, load_detection_checkpoint
from .model import OverLoCKMaskRCNN

__all__ = ["create_detection_model", "load_detection_checkpoint", "OverLoCKMaskRCNN", "COCO_CLASSES"]
