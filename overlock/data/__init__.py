"""Data for the command line: ImageFolder checks, a corrupt-image-tolerant data set, a resumable sampler."""
from .folder import DataError, ImageFolderSplit, check_image_folder, find_classes
from .sampler import ResumableSampler, ShardSampler

__all__ = ["DataError", "ImageFolderSplit", "check_image_folder", "find_classes", "ResumableSampler",
           "ShardSampler"]
