"""The data of ``gspn distill-encoder``: scikit-learn's bundled digits, split and transformed exactly as
``gspn train`` does, so that a teacher trained there is distilled on its own training images and the
student is validated on the teacher's validation images.

Built on :mod:`gspn._images` (the library's one image-loading module: :func:`~gspn._images.load_digits`,
:func:`~gspn._images.random_resized_crop`, :func:`~gspn._images.center_crop_resize`); recipes never
import each other, so the classification recipe's dataset classes are not used — ``tests/
test_distill_encoder.py`` pins that the split, the images and the transforms are the same.

* split: per class, a seeded permutation (``numpy.random.RandomState(0)``), the first 20 % for validation;
* training transform: random resized crop (area ``[0.7, 1]``, aspect ``[0.8, 1.25]``, drawn from torch's
  global RNG), no flip, normalisation; evaluation: resize to the side (``crop_pct = 1``), normalisation;
* ``train_limit`` / ``val_limit``: a fixed class-mixed subset (``RandomState(1234)`` permutation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from .._images import center_crop_resize, load_digits, random_resized_crop

__all__ = ["DIGITS_MEAN", "DIGITS_STD", "DataBundle", "DigitsSplit", "build_data", "digits_val_mask"]

#: Mean and standard deviation of the digits' pixels (in ``[0, 1]``), ``gspn train``'s defaults.
DIGITS_MEAN, DIGITS_STD = 0.3053, 0.3760
_VAL_FRACTION, _SPLIT_SEED, _LIMIT_SEED = 0.2, 0, 1234


def digits_val_mask(labels: np.ndarray, val_fraction: float = _VAL_FRACTION, seed: int = _SPLIT_SEED) -> np.ndarray:
    """Boolean mask of the validation images: per class (0–9, in order), the first
    ``round(n_c · val_fraction)`` of a ``RandomState(seed)`` permutation of that class's indices."""
    rng = np.random.RandomState(seed)
    is_val = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        is_val[idx[: round(len(idx) * val_fraction)]] = True
    return is_val


class DigitsSplit(Dataset):
    """One split of the digits as ``(image (in_chans, size, size) float32, label)`` pairs.

    Args:
        split: ``"train"`` (random resized crop) or ``"val"`` (resize only).
        size: image side.
        in_chans: channels (the grey image repeated).
        mean, std: per-channel normalisation.

    Raises:
        ValueError: an unknown ``split``.
    """

    def __init__(self, split: str, size: int, in_chans: int, mean: Sequence[float], std: Sequence[float]) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        images, labels = load_digits(size)
        is_val = digits_val_mask(labels.numpy())
        keep = torch.from_numpy(is_val if split == "val" else ~is_val)
        self.train = split == "train"
        self.images, self.targets = images[keep], labels[keep]
        self.size, self.in_chans = size, in_chans
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.classes = [str(c) for c in range(10)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i].expand(self.in_chans, -1, -1)
        if self.train:
            img = random_resized_crop(img, self.size, (0.7, 1.0), (0.8, 1.25))
        else:
            img = center_crop_resize(img, self.size, 1.0)
        return (img - self.mean) / self.std, int(self.targets[i])


@dataclass
class DataBundle:
    """The datasets and the facts about them a run and its exported weights record."""

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
    if not n or n >= len(ds):  # type: ignore[arg-type]
        return ds
    perm = np.random.RandomState(_LIMIT_SEED).permutation(len(ds))[:n]  # type: ignore[arg-type]
    return Subset(ds, sorted(perm.tolist()))


def build_data(source: str, img_size: int | None = None, in_chans: int = 3, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None, train_limit: int | None = None,
               val_limit: int | None = None) -> DataBundle:
    """The train/val datasets of ``source`` (``"digits"``; side 32 and the digits' statistics by default).

    Raises:
        ValueError: another ``source`` (image folders are not supported by this recipe yet).
    """
    if source != "digits":
        raise ValueError(f"--data {source!r}: gspn distill-encoder reads the bundled 'digits' only")
    size = img_size or 32
    m = tuple(float(v) for v in mean) if mean else (DIGITS_MEAN,) * in_chans
    s = tuple(float(v) for v in std) if std else (DIGITS_STD,) * in_chans
    train, val = DigitsSplit("train", size, in_chans, m, s), DigitsSplit("val", size, in_chans, m, s)
    return DataBundle(train=_limit(train, train_limit), val=_limit(val, val_limit), classes=train.classes,
                      img_size=size, in_chans=in_chans, mean=m, std=s, source="digits",
                      info={"dataset": "sklearn.datasets.load_digits", "val_fraction": _VAL_FRACTION,
                            "split_seed": _SPLIT_SEED})
