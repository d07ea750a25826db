"""The data of ``gspn distill-encoder``: :func:`gspn.datasets.build_data`, the very datasets ``gspn train``
builds (the bundled digits with their fixed split, or an ImageFolder root), so that a teacher trained
there is distilled on its own training images and the student is validated on the teacher's
validation images."""

from ..datasets import DataBundle, build_data

__all__ = ["DataBundle", "build_data"]
