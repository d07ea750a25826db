"""Image loading for every recipe: file discovery, decoding, resizing and cropping, bundled digits.

The one place where the library turns files (or scikit-learn's bundled digits) into tensors; the
classification and encoder-distillation (:mod:`gspn.datasets`), DiT (:mod:`gspn.recipes.diffusion.data`,
hence ``extract-latents``) and UNet-distillation (:mod:`gspn.recipes.unet_distillation.data`) recipes all
use it. Only torch, numpy and (lazily) Pillow and scikit-learn are imported.

* files: :data:`IMAGE_EXTENSIONS`, :func:`is_image_file`, :func:`find_images`;
* decoding: :func:`read_image` (Pillow → ``(C, H, W)`` uint8, with mode conversion and an optional
  Pillow-bicubic shorter-side resize + centre crop), :func:`to_float` (uint8 → ``[0, 1]`` or ``[-1, 1]``);
* tensor transforms (torch only, bilinear with antialiasing): :func:`resize`,
  :func:`center_crop_resize`, :func:`random_resized_crop`;
* :func:`load_digits`: scikit-learn's 8×8 digits as a tensor.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "IMAGE_EXTENSIONS",
    "center_crop_resize",
    "find_images",
    "is_image_file",
    "load_digits",
    "random_resized_crop",
    "read_image",
    "resize",
    "to_float",
]

#: Lower-case suffixes of the image files read by ``gspn train``, ``train-dit``/``extract-latents`` and
#: ``distill`` (PIL opens them all; animated GIFs and multi-page TIFFs give their first frame).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

#: Channels of the Pillow modes :func:`read_image` converts to.
_MODE_CHANNELS = {"RGB": 3, "L": 1}


def is_image_file(name: str | os.PathLike[str]) -> bool:
    """Whether ``name`` ends in one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.fspath(name).lower().endswith(IMAGE_EXTENSIONS)


def find_images(root: str | os.PathLike[str]) -> list[Path]:
    """Every image file (:data:`IMAGE_EXTENSIONS`) under ``root``, searched recursively, sorted by path.

    Returns an empty list when there is none (or ``root`` is not a folder): callers word their own error.
    """
    return sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _require(module: str, what: str) -> None:
    raise ModuleNotFoundError(f"{what} needs {module!r}, which is not installed: pip install 'gspn[data]'", name=module)


def read_image(path: str | os.PathLike[str], mode: str = "RGB", size: int | None = None) -> torch.Tensor:
    """Decode an image file with Pillow.

    Args:
        path: the file (any format Pillow opens; multi-frame files give their first frame).
        mode: ``"RGB"`` (3 channels) or ``"L"`` (greyscale, 1 channel); the image is converted to it.
        size: if given, the shorter side is resized to ``size`` with Pillow's bicubic filter (the longer
            one to ``max(size, round(side · size / shorter))``) and the centre ``size × size`` is cropped
            (left/top offset ``(side − size) // 2``).

    Returns:
        ``(C, H, W)`` uint8 tensor (``(C, size, size)`` when ``size`` is given).

    Raises:
        ValueError: ``mode`` not ``"RGB"``/``"L"`` or ``size`` not a positive integer.
        ModuleNotFoundError: Pillow is missing (names the ``gspn[data]`` extra).
        OSError: Pillow cannot read the file.
    """
    if mode not in _MODE_CHANNELS:
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
        raise ValueError(f"size must be a positive integer or None, got {size!r}")
    try:
        from PIL import Image
    except ModuleNotFoundError:
        _require("PIL", "reading image files")
    with Image.open(path) as im:
        im = im.convert(mode)
        if size is not None:
            w, h = im.size
            s = size / min(w, h)
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im, dtype=np.uint8)
    img = torch.from_numpy(arr.copy())
    return img[None] if img.ndim == 2 else img.permute(2, 0, 1).contiguous()


def to_float(img: torch.Tensor, value_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """uint8 pixels ``(…)`` → float32 in ``value_range``: ``(0, 1)`` divides by 255, ``(-1, 1)`` computes
    ``x / 127.5 − 1``. ``ValueError`` for another range or a non-uint8 ``img``."""
    if img.dtype != torch.uint8:
        raise ValueError(f"img must be uint8, got {img.dtype}")
    if tuple(value_range) == (0.0, 1.0):
        return img.float().div_(255.0)
    if tuple(value_range) == (-1.0, 1.0):
        return img.float() / 127.5 - 1.0
    raise ValueError(f"value_range must be (0, 1) or (-1, 1), got {value_range!r}")


def resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with antialiasing of a ``(C, H, W)`` float image to ``size = (H', W')``
    (``img`` itself when it already has that size)."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    return F.interpolate(img[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def random_resized_crop(
    img: torch.Tensor,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Crop a random area fraction in ``scale`` with aspect ratio in ``ratio``, resize to ``size²``.

    ``img`` is ``(C, H, W)`` float; returns ``(C, size, size)``. Draws from torch's global RNG. Falls back
    to a central crop of the nearest admissible aspect ratio after 10 rejected draws (the Inception-style
    procedure of Szegedy et al., "Going Deeper with Convolutions", 2015).
    """
    _, h, w = img.shape
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(()).item())
        aspect = math.exp(log_r[0] + (log_r[1] - log_r[0]) * torch.rand(()).item())
        cw = round(math.sqrt(target * aspect))
        ch = round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, ()).item())
            left = int(torch.randint(0, w - cw + 1, ()).item())
            return resize(img[:, top : top + ch, left : left + cw], (size, size))
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        ch, cw = h, round(h * ratio[1])
    else:
        cw, ch = w, h
    top, left = (h - ch) // 2, (w - cw) // 2
    return resize(img[:, top : top + ch, left : left + cw], (size, size))


def center_crop_resize(img: torch.Tensor, size: int, crop_pct: float = 0.875) -> torch.Tensor:
    """Evaluation transform of a ``(C, H, W)`` float image: resize the shorter side to ``size / crop_pct``
    (:func:`resize`), then centre-crop ``(C, size, size)``."""
    _, h, w = img.shape
    short = size / crop_pct
    nh, nw = max(size, round(h * short / min(h, w))), max(size, round(w * short / min(h, w)))
    img = resize(img, (nh, nw))
    top, left = (nh - size) // 2, (nw - size) // 2
    return img[:, top : top + size, left : left + size]


def load_digits(size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled handwritten digits (1797 images of 8×8, 10 classes; no download).

    Args:
        size: side of the returned images; other than 8 they are upsampled bilinearly
            (``align_corners=False``, no antialiasing).

    Returns:
        ``(images, labels)``: ``(1797, 1, size, size)`` float32 in ``[0, 1]`` (the 0–16 pixel counts
        divided by 16; bilinear upsampling stays in range) and ``(1797,)`` int64, in scikit-learn's order.

    Raises:
        ValueError: ``size`` not a positive integer.
        ModuleNotFoundError: scikit-learn is missing (names the ``gspn[data]`` extra).
    """
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ModuleNotFoundError:
        _require("sklearn", "the bundled digits data set")
    data = sklearn_digits()
    images = torch.from_numpy(np.asarray(data.images, dtype=np.float32) / 16.0)[:, None]
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images, torch.from_numpy(np.asarray(data.target, dtype=np.int64))
