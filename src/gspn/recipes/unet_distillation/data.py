"""Captions (and optionally images) for UNet distillation.

Two sources:

* a text file: one caption per line (blank lines and lines starting with ``#`` are skipped);
  no images, the recipe then uses Gaussian latents (see :mod:`.train`);
* an image-caption folder: every image (:data:`gspn._images.IMAGE_EXTENSIONS`, searched recursively)
  with a sibling ``<stem>.txt`` caption, or a ``metadata.jsonl`` with ``file_name`` and ``text``
  fields (the Hugging Face *imagefolder* layout). Images without a caption get an empty one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..._images import find_images, read_image, to_float

__all__ = ["CaptionData", "load_captions", "load_image"]


@dataclass
class CaptionData:
    """Captions and, for an image folder, the image path of each caption."""

    captions: list[str]
    images: list[Path] | None = None

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def has_images(self) -> bool:
        """Whether each caption comes with an image."""
        return self.images is not None


def load_captions(path: str | os.PathLike) -> CaptionData:
    """Read a caption file or an image-caption folder (see the module docstring)."""
    path = Path(path)
    if path.is_file():
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        captions = [ln for ln in lines if ln and not ln.startswith("#")]
        if not captions:
            raise ValueError(f"no captions in {path}")
        return CaptionData(captions)
    if not path.is_dir():
        raise FileNotFoundError(f"caption source {path} is neither a file nor a folder")
    meta = path / "metadata.jsonl"
    if meta.is_file():
        images, captions = [], []
        for line in meta.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                images.append(path / rec["file_name"])
                captions.append(str(rec.get("text", "")))
    else:
        images = find_images(path)
        captions = []
        for img in images:
            txt = img.with_suffix(".txt")
            captions.append(txt.read_text(encoding="utf-8").strip() if txt.is_file() else "")
    if not images:
        raise ValueError(f"no images found in {path}")
    return CaptionData(captions, images)


def load_image(path: Path, image_size: int) -> torch.Tensor:
    """An image as a ``(3, S, S)`` float32 tensor in ``[-1, 1]`` (``S = image_size``): RGB, shorter side
    resized to ``S`` (bicubic), centre crop (:func:`gspn._images.read_image`)."""
    return to_float(read_image(path, "RGB", image_size), (-1.0, 1.0))
