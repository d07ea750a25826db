"""The classification recipe's data: :mod:`gspn.datasets` (shared with ``gspn distill-encoder``),
re-exported under its historical name."""

from ..datasets import (
    IMAGE_EXTENSIONS,
    DataBundle,
    DigitsDataset,
    ImageFolderDataset,
    Transform,
    build_data,
    center_crop_resize,
    random_resized_crop,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataBundle",
    "DigitsDataset",
    "ImageFolderDataset",
    "Transform",
    "build_data",
    "center_crop_resize",
    "random_resized_crop",
]
