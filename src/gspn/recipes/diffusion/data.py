"""Training data for the diffusion trainer: bundled digits, an ImageFolder, or extracted latents.

Every dataset is a :class:`torch.utils.data.TensorDataset`-like object of ``(x, y)`` with ``x``
in the model's data scale — images in ``[-1, 1]``, latents already multiplied by the VAE's scaling
factor — and ``y`` an int64 class label. Everything is loaded into memory (small data only).

* ``digits``: scikit-learn's bundled 8×8 digits (1797 images, 10 classes; no download),
  bilinearly upsampled to ``image_size`` (16 or 32), 1 or 3 channels.
* ``imagefolder:PATH``: ``PATH/<class>/*.png|jpg|...`` (classes sorted by name), resized
  (shorter side) and centre-cropped to ``image_size``.
* ``latents:PATH``: a file written by ``gspn extract-latents``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from ..._files import safe_torch_load
from ..._images import IMAGE_EXTENSIONS, find_images, read_image, to_float
from ..._images import load_digits as _digit_images
from ...training_utils import ConfigError

__all__ = ["IMAGE_EXTENSIONS", "load_dataset", "load_digits", "load_image_folder", "load_latents"]


def load_digits(image_size: int = 16, channels: int = 1, limit: int | None = None) -> TensorDataset:
    """sklearn's bundled digits (:func:`gspn._images.load_digits`, bilinearly upsampled to ``image_size``)
    as ``(N, channels, image_size, image_size)`` float32 in ``[-1, 1]`` and int64 labels ``(N,)``; the
    first ``limit`` images if given. ``ModuleNotFoundError`` naming ``gspn[data]`` without scikit-learn."""
    x, y = _digit_images(image_size)  # (N, 1, S, S) in [0, 1]
    x = (x.clamp(0, 1) * 2 - 1).repeat(1, channels, 1, 1)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return TensorDataset(x.contiguous(), y)


def _list_image_folder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class sub-folders (expected ROOT/<class>/<image>)")
    paths, labels = [], []
    for i, name in enumerate(classes):
        found = find_images(root / name)
        paths += found
        labels += [i] * len(found)
    if not paths:
        raise ValueError(f"no images found under {root}")
    return paths, labels, classes


def load_image_folder(root: str | os.PathLike, image_size: int = 32, channels: int = 3) -> TensorDataset:
    """An ImageFolder tree ``root/<class>/<image>`` (classes sorted by name) as ``(N, channels, S, S)``
    float32 in ``[-1, 1]`` (:func:`gspn._images.read_image`: shorter side to ``S = image_size``, bicubic,
    centre crop) and int64 labels; ``dataset.classes`` lists the class names. ``ValueError`` when there
    are no class folders or no images, or ``channels`` is not 1 or 3."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (greyscale) or 3 (RGB) for image folders, got {channels!r}")
    paths, labels, classes = _list_image_folder(Path(root))
    mode = "RGB" if channels == 3 else "L"
    out = [to_float(read_image(p, mode, image_size), (-1.0, 1.0)) for p in paths]
    ds = TensorDataset(torch.stack(out), torch.tensor(labels, dtype=torch.long))
    ds.classes = classes  # type: ignore[attr-defined]
    return ds


def load_latents(path: str | os.PathLike) -> tuple[TensorDataset, dict[str, Any]]:
    """Latents written by ``gspn extract-latents``: the dataset and its metadata (VAE, scaling, ...)."""
    blob = safe_torch_load(path)
    ds = TensorDataset(blob["latents"].float(), blob["labels"].long())
    return ds, dict(blob.get("meta", {}))


def load_dataset(
    spec: str, image_size: int = 16, channels: int = 1, field: str = "data"
) -> tuple[TensorDataset, dict[str, Any]]:
    """Resolve a data setting: ``digits``, ``imagefolder:PATH`` or ``latents:PATH`` (``field``: the config
    field named in errors).

    Returns the dataset and metadata with at least ``kind``, ``num_classes`` and ``shape``
    (``(C, H, W)`` of one sample).

    Raises:
        ConfigError: an unknown spelling, or a folder or file that does not exist (naming ``field``).
    """
    kind, _, where = spec.partition(":")
    if kind in ("imagefolder", "latents") and not Path(where).exists():  # name the field, not just errno
        raise ConfigError(field, f"{spec}: no such {'folder' if kind == 'imagefolder' else 'file'}")
    if spec == "digits":
        ds, meta = load_digits(image_size, channels), {"kind": "pixels", "num_classes": 10}
    elif spec.startswith("imagefolder:"):
        ds = load_image_folder(spec.split(":", 1)[1], image_size, channels)
        meta = {"kind": "pixels", "num_classes": len(ds.classes), "classes": ds.classes}
    elif spec.startswith("latents:"):
        ds, meta = load_latents(spec.split(":", 1)[1])
        meta = {**meta, "kind": "latents"}
        meta.setdefault("num_classes", int(ds.tensors[1].max()) + 1)
    else:
        raise ConfigError(field, f"must be digits, imagefolder:PATH or latents:PATH, not {spec!r}")
    meta["shape"] = tuple(ds.tensors[0].shape[1:])
    return ds, meta
