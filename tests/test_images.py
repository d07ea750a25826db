"""One list of image extensions for every data loader (distillation used to skip .gif/.tif)."""

from __future__ import annotations

import pytest

from gspn._images import IMAGE_EXTENSIONS, is_image_file


def test_every_loader_accepts_the_same_image_files():
    from gspn import datasets
    from gspn.recipes.diffusion import data as dit_data

    assert datasets.IMAGE_EXTENSIONS is dit_data.IMAGE_EXTENSIONS is IMAGE_EXTENSIONS
    assert {".gif", ".tif", ".tiff", ".png", ".jpg"} <= set(IMAGE_EXTENSIONS)
    assert is_image_file("A.GIF") and is_image_file("x.tif") and not is_image_file("x.txt")


def test_every_recipe_uses_the_one_image_module():
    import gspn._images as images
    from gspn import datasets
    from gspn.recipes.classification import train as classification
    from gspn.recipes.diffusion import data as dit_data
    from gspn.recipes.encoder_distillation import train as encoder
    from gspn.recipes.unet_distillation import data as distill_data

    for name in ("center_crop_resize", "random_resized_crop"):
        assert getattr(datasets, name) is getattr(images, name)
    assert classification.build_data is encoder.build_data is datasets.build_data
    for module in (datasets, dit_data, distill_data):
        assert module.read_image is images.read_image and module.find_images is images.find_images
        assert not hasattr(module, "_resize") and not hasattr(module, "Image")


def _png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)
    return path


def test_read_image_converts_modes_and_crops_the_centre(tmp_path):
    import numpy as np
    import torch

    from gspn._images import read_image, to_float

    pytest.importorskip("PIL")
    rgb = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    path = _png(tmp_path / "a.png", rgb)
    img = read_image(path)
    assert img.dtype == torch.uint8 and img.shape == (3, 4, 6)
    assert torch.equal(img, torch.from_numpy(rgb).permute(2, 0, 1))
    grey = read_image(path, "L")
    assert grey.shape == (1, 4, 6)
    r, g, b = (torch.from_numpy(rgb[..., i]).int() for i in range(3))
    expected = (r * 299 + g * 587 + b * 114 + 500) // 1000  # Pillow's ITU-R 601-2 luma, rounded
    assert (grey[0].int() - expected).abs().max() <= 1
    square = read_image(path, size=4)  # shorter side already 4: no resampling, centre 4×4 of the 6 columns
    assert torch.equal(square, img[:, :, 1:5])
    assert read_image(path, size=3).shape == (3, 3, 3)
    assert torch.equal(to_float(torch.tensor([0, 255], dtype=torch.uint8)), torch.tensor([0.0, 1.0]))
    assert torch.equal(to_float(torch.tensor([0, 255], dtype=torch.uint8), (-1.0, 1.0)), torch.tensor([-1.0, 1.0]))
    with pytest.raises(ValueError, match="mode"):
        read_image(path, "CMYK")
    with pytest.raises(ValueError, match="size"):
        read_image(path, size=0)
    with pytest.raises(ValueError, match="value_range"):
        to_float(img, (0.0, 255.0))
    with pytest.raises(ValueError, match="img"):
        to_float(img.float())


def test_find_images_is_recursive_sorted_and_skips_folders(tmp_path):
    from gspn._images import find_images

    (tmp_path / "b").mkdir()
    (tmp_path / "dir.png").mkdir()  # a folder with an image suffix is not an image
    for name in ("b/z.GIF", "a.tif", "notes.txt", "c.jpeg"):
        (tmp_path / name).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)] == ["a.tif", "b/z.GIF", "c.jpeg"]
    assert find_images(tmp_path / "missing") == []


def test_one_digits_loader_and_its_missing_extra_message(monkeypatch):
    import sys

    import torch

    pytest.importorskip("sklearn")
    from gspn._images import load_digits

    x, y = load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() == 0 and x.max() == 1 and torch.equal(torch.bincount(y), torch.bincount(y).clamp(min=174))
    big, _ = load_digits(16)
    assert big.shape == (1797, 1, 16, 16)
    torch.testing.assert_close(big.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=0.02, rtol=0)
    with pytest.raises(ValueError, match="size"):
        load_digits(0)
    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if scikit-learn were not installed
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ModuleNotFoundError, match=r"gspn\[data\]") as info:
        load_digits()
    assert info.value.name == "sklearn"


def test_build_data_rejects_a_mean_or_std_of_another_channel_count(tmp_path):
    """An explicit mean/std must have one value per channel (only the defaults are averaged)."""
    from gspn.datasets import build_data

    with pytest.raises(ValueError, match="mean has 2 values but in_chans = 3"):
        build_data(str(tmp_path), in_chans=3, mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="std has 1 values but in_chans = 3"):
        build_data(str(tmp_path), in_chans=3, std=(0.5,))
