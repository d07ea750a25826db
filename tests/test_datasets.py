"""gspn.datasets: the digits split, ImageFolder data and the transforms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gspn.datasets import DigitsDataset, build_data, center_crop_resize, random_resized_crop


def test_digits_split_is_fixed_stratified_and_disjoint() -> None:
    tr = DigitsDataset("train", 8, 1)
    va = DigitsDataset("val", 8, 1)
    assert len(tr) + len(va) == 1797 and 350 <= len(va) <= 370
    assert not set(tr.indices) & set(va.indices)
    assert torch.bincount(va.targets, minlength=10).min() >= 34  # every class in val
    assert torch.equal(DigitsDataset("val", 8, 1).targets, va.targets)  # deterministic


def test_build_data_shapes_and_channels() -> None:
    d = build_data("digits", img_size=24, in_chans=2)
    x, y = d.train[0]
    assert x.shape == (2, 24, 24) and isinstance(y, int) and d.num_classes == 10
    xv, _ = d.val[0]
    assert xv.shape == (2, 24, 24)
    assert abs(float(torch.stack([d.val[i][0] for i in range(100)]).mean())) < 0.5  # normalised


def test_transforms() -> None:
    torch.manual_seed(0)
    img = torch.rand(3, 40, 60)
    for _ in range(20):
        assert random_resized_crop(img, 16).shape == (3, 16, 16)
    assert random_resized_crop(img, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0)).shape == (3, 16, 16)
    out = center_crop_resize(img, 32, crop_pct=0.875)
    assert out.shape == (3, 32, 32)
    # full-scale, identity-ratio crop of a square image is a plain resize
    sq = torch.rand(1, 8, 8)
    assert torch.allclose(random_resized_crop(sq, 8, scale=(1, 1), ratio=(1, 1)), sq)


def test_validation_classes_the_training_set_lacks_are_an_error(tmp_path: Path) -> None:
    # val/c used to be dropped without a word (and the run reported its accuracy on the rest)
    from PIL import Image

    for split, classes in (("train", ("a", "b")), ("val", ("a", "c"))):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / split / c / "0.png")
    with pytest.raises(ValueError, match="class folders the training set lacks: c"):
        build_data(str(tmp_path), img_size=8)
