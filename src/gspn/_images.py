"""Image files: the one list of extensions every data loader of the library accepts."""

from __future__ import annotations

__all__ = ["IMAGE_EXTENSIONS", "is_image_file"]

#: Lower-case suffixes of the image files read by ``gspn train``, ``train-dit``/``extract-latents`` and
#: ``distill`` (PIL opens them all; animated GIFs and multi-page TIFFs give their first frame).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def is_image_file(name: str) -> bool:
    """Whether ``name`` ends in one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)
