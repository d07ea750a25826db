"""Classification datasets and transforms, with no torchvision: the one place ``gspn train`` and
``gspn distill-encoder`` (any recipe that reads labelled images) build their data.

Two sources:

* ``"digits"`` — scikit-learn's bundled 8×8 handwritten digits (1797 images, 10 classes), upsampled to
  the requested size and repeated to the requested number of channels. The train/val split is fixed
  (stratified, 20 % validation, seeded), so every machine sees the same split with no download.
* a directory in the ImageFolder layout — ``root/train/<class>/*.png|jpg|…`` and ``root/val/<class>/…``
  — decoded with Pillow.

Decoding, resizing and cropping are :mod:`gspn._images`' (the one image-loading module of the library).
Augmentation (random resized crop, horizontal flip) and normalisation are written with torch ops and
draw from torch's global RNG, which :class:`torch.utils.data.DataLoader` seeds per worker from its
generator; so a run is reproducible from the loader generator's state.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from ._images import (
    IMAGE_EXTENSIONS,
    center_crop_resize,
    find_images,
    load_digits,
    random_resized_crop,
    read_image,
    to_float,
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


@dataclass
class Transform:
    """Per-sample transform for ``(C, H, W)`` float images in ``[0, 1]``.

    Training: random resized crop (``scale``, ``ratio``) then horizontal flip with probability ``hflip``.
    Evaluation: :func:`center_crop_resize` with ``crop_pct`` (``crop_pct=1`` just resizes a square
    image). Both end with per-channel normalisation by ``mean``/``std``.
    """

    size: int
    mean: Sequence[float]
    std: Sequence[float]
    train: bool
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    crop_pct: float = 0.875

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if self.train:
            img = random_resized_crop(img, self.size, self.scale, self.ratio)
            if self.hflip > 0 and torch.rand(()).item() < self.hflip:
                img = img.flip(-1)
        else:
            img = center_crop_resize(img, self.size, self.crop_pct)
        mean = torch.as_tensor(self.mean, dtype=img.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=img.dtype).view(-1, 1, 1)
        return (img - mean) / std


class DigitsDataset(Dataset):
    """scikit-learn's 8×8 digits, bilinearly upsampled to ``base_size`` and repeated to ``in_chans``."""

    def __init__(
        self,
        split: str,
        base_size: int,
        in_chans: int,
        transform: Transform | None = None,
        val_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        images, labels = load_digits()  # (N, 1, 8, 8) in [0, 1]
        targets = labels.numpy()
        rng = np.random.RandomState(seed)
        val_idx: list[np.ndarray] = []
        for c in range(10):
            idx = np.flatnonzero(targets == c)
            idx = idx[rng.permutation(len(idx))]
            val_idx.append(idx[: round(len(idx) * val_fraction)])
        is_val = np.zeros(len(targets), dtype=bool)
        is_val[np.concatenate(val_idx)] = True
        keep = is_val if split == "val" else ~is_val
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        #: indices into ``load_digits()`` of this split's images
        self.indices = np.flatnonzero(keep)
        x = images[torch.from_numpy(keep)]
        self.images = F.interpolate(x, size=(base_size, base_size), mode="bilinear", align_corners=False)
        self.targets = torch.from_numpy(targets[keep])
        self.in_chans = in_chans
        self.transform = transform
        self.classes = [str(c) for c in range(10)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i].expand(self.in_chans, -1, -1)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[i])


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` decoded with Pillow into ``(C, H, W)`` floats in ``[0, 1]``."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        in_chans: int = 3,
        transform: Transform | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        if in_chans not in (1, 3):
            raise ValueError("image folders are read as RGB (in_chans=3) or greyscale (in_chans=1)")
        self.classes = list(classes) if classes is not None else sorted(p.name for p in root.iterdir() if p.is_dir())
        if not self.classes:
            raise ValueError(f"no class directories in {root}")
        unknown = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in self.classes)
        if unknown:  # e.g. val/<class> without train/<class>: its images would be dropped without a word
            raise ValueError(f"{root} has class folders the training set lacks: {', '.join(unknown)}")
        self.samples: list[tuple[Path, int]] = []
        for idx, name in enumerate(self.classes):
            d = root / name
            if not d.is_dir():
                continue
            self.samples += [(p, idx) for p in find_images(d)]
        if not self.samples:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        self.mode = "RGB" if in_chans == 3 else "L"
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[i]
        img = to_float(read_image(path, self.mode))
        if self.transform is not None:
            img = self.transform(img)
        return img, target


@dataclass
class DataBundle:
    """The datasets and the facts about them the trainer and checkpoints need."""

    train: Dataset
    val: Dataset
    classes: list[str]
    img_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _limit(ds: Dataset, n: int | None) -> Dataset:
    """The first ``n`` samples of ``ds`` in a fixed, class-mixed order (seeded permutation)."""
    if not n or n >= len(ds):  # type: ignore[arg-type]
        return ds
    perm = np.random.RandomState(1234).permutation(len(ds))[:n]  # type: ignore[arg-type]
    return Subset(ds, sorted(perm.tolist()))


def build_data(
    source: str,
    img_size: int | None = None,
    in_chans: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    scale: tuple[float, float] | None = None,
    hflip: float | None = None,
    crop_pct: float | None = None,
    train_limit: int | None = None,
    val_limit: int | None = None,
    model_cfg: dict | None = None,
) -> DataBundle:
    """Build the train/val datasets for ``source`` (``"digits"`` or an ImageFolder root).

    Unset options get per-source defaults: digits → 32 px, mean/std of the digits' pixels, crop scale
    (0.7, 1), no flip (digits are not mirror-symmetric), crop_pct 1; image folders → the model's
    ``default_cfg`` input size and mean/std (else 224 and the ImageNet statistics), crop scale
    (0.08, 1), flip 0.5, crop_pct 0.875.
    """
    model_cfg = model_cfg or {}
    if source == "digits":
        size = img_size or 32
        m = tuple(mean) if mean else (0.3053,) * in_chans
        s = tuple(std) if std else (0.3760,) * in_chans
        kw = dict(scale=scale or (0.7, 1.0), ratio=(0.8, 1.25), hflip=0.0 if hflip is None else hflip)
        cp = 1.0 if crop_pct is None else crop_pct
        train = DigitsDataset("train", size, in_chans, Transform(size, m, s, True, crop_pct=cp, **kw))
        val = DigitsDataset("val", size, in_chans, Transform(size, m, s, False, crop_pct=cp, **kw))
        classes = train.classes
        info = {"dataset": "sklearn.datasets.load_digits", "val_fraction": 0.2, "split_seed": 0}
    else:
        root = Path(source)
        cfg_size = model_cfg.get("input_size", (in_chans, 224, 224))[-1]
        size = img_size or int(cfg_size)
        for name, given in (("mean", mean), ("std", std)):
            if given and len(given) != in_chans:
                raise ValueError(f"{name} has {len(given)} values but in_chans = {in_chans}: give one per channel")
        m = tuple(mean) if mean else tuple(model_cfg.get("mean", (0.485, 0.456, 0.406)))[:in_chans]
        s = tuple(std) if std else tuple(model_cfg.get("std", (0.229, 0.224, 0.225)))[:in_chans]
        if len(m) != in_chans or len(s) != in_chans:  # the defaults for another channel count: their average
            m, s = (sum(m) / len(m),) * in_chans, (sum(s) / len(s),) * in_chans
        kw = dict(scale=scale or (0.08, 1.0), hflip=0.5 if hflip is None else hflip)
        cp = 0.875 if crop_pct is None else crop_pct
        train = ImageFolderDataset(root / "train", in_chans, Transform(size, m, s, True, crop_pct=cp, **kw))
        classes = train.classes
        val = ImageFolderDataset(
            root / "val", in_chans, Transform(size, m, s, False, crop_pct=cp, **kw), classes=classes
        )
        info = {"dataset": "image_folder", "root": str(root.resolve())}
    return DataBundle(
        train=_limit(train, train_limit),
        val=_limit(val, val_limit),
        classes=list(classes),
        img_size=size,
        in_chans=in_chans,
        mean=tuple(float(x) for x in m),
        std=tuple(float(x) for x in s),
        source=source if source == "digits" else str(Path(source).resolve()),
        info=info,
    )
