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

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from .._files import safe_torch_load
from .._images import IMAGE_EXTENSIONS

__all__ = ["IMAGE_EXTENSIONS", "load_dataset", "load_digits", "load_image_folder", "load_latents"]



def load_digits(image_size: int = 16, channels: int = 1, limit: int | None = None) -> TensorDataset:
    """sklearn digits as ``(N, channels, image_size, image_size)`` in ``[-1, 1]`` and labels ``(N,)``."""
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = torch.from_numpy(data.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 2 - 1).repeat(1, channels, 1, 1)
    y = torch.from_numpy(data.target.astype(np.int64))
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return TensorDataset(x.contiguous(), y)


def _list_image_folder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class sub-folders (expected ROOT/<class>/<image>)")
    paths, labels = [], []
    for i, name in enumerate(classes):
        for p in sorted((root / name).rglob("*")):
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(p)
                labels.append(i)
    if not paths:
        raise ValueError(f"no images found under {root}")
    return paths, labels, classes


def load_image_folder(root: str | os.PathLike, image_size: int = 32, channels: int = 3) -> TensorDataset:
    """An ImageFolder tree as tensors in ``[-1, 1]``; ``dataset.classes`` lists the class names."""
    from PIL import Image

    paths, labels, classes = _list_image_folder(Path(root))
    mode = "RGB" if channels == 3 else "L"
    out = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert(mode)
            w, h = im.size
            s = image_size / min(w, h)
            im = im.resize((max(image_size, round(w * s)), max(image_size, round(h * s))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - image_size) // 2, (h - image_size) // 2
            im = im.crop((left, top, left + image_size, top + image_size))
            arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
        out.append(torch.from_numpy(arr.reshape(image_size, image_size, channels)).permute(2, 0, 1))
    ds = TensorDataset(torch.stack(out), torch.tensor(labels, dtype=torch.long))
    ds.classes = classes  # type: ignore[attr-defined]
    return ds


def load_latents(path: str | os.PathLike) -> tuple[TensorDataset, dict[str, Any]]:
    """Latents written by ``gspn extract-latents``: the dataset and its metadata (VAE, scaling, ...)."""
    blob = safe_torch_load(path)
    ds = TensorDataset(blob["latents"].float(), blob["labels"].long())
    return ds, dict(blob.get("meta", {}))


def load_dataset(spec: str, image_size: int = 16, channels: int = 1) -> tuple[TensorDataset, dict[str, Any]]:
    """Resolve ``--data``: ``digits``, ``imagefolder:PATH`` or ``latents:PATH``.

    Returns the dataset and metadata with at least ``kind``, ``num_classes`` and ``shape``
    (``(C, H, W)`` of one sample).
    """
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
        raise ValueError(f"unknown --data {spec!r}: use digits, imagefolder:PATH or latents:PATH")
    meta["shape"] = tuple(ds.tensors[0].shape[1:])
    return ds, meta
