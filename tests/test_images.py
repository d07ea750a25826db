"""One list of image extensions for every data loader (distillation used to skip .gif/.tif)."""

from __future__ import annotations

from gspn._images import IMAGE_EXTENSIONS, is_image_file


def test_every_loader_accepts_the_same_image_files():
    from gspn.diffusion import data as dit_data
    from gspn.distill import data as distill_data
    from gspn.train import data as train_data

    assert train_data.IMAGE_EXTENSIONS is dit_data.IMAGE_EXTENSIONS is distill_data.IMAGE_SUFFIXES is IMAGE_EXTENSIONS
    assert {".gif", ".tif", ".tiff", ".png", ".jpg"} <= set(IMAGE_EXTENSIONS)
    assert is_image_file("A.GIF") and is_image_file("x.tif") and not is_image_file("x.txt")
