"""Tiny configs shared by the tests: models that train in a second on 16×16 digits, and the command lines
of tiny runs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

#: ``baseline_conv`` overrides: a few thousand parameters.
TINY_CONV: dict[str, Any] = {"width": 8}
#: ``baseline_vit`` overrides: one block of width 32 on 4×4 patches (with dropout, so RNG matters).
TINY_VIT: dict[str, Any] = {"embed_dim": 32, "depth": 1, "patch_size": 4, "pos_grid": 4, "drop": 0.1}


def classification_config(tmp_path: Path, name: str, **overrides: Any):
    """A :class:`~gspn.recipes.classification.ClassificationConfig` of a tiny ``baseline_conv`` run on
    16×16 digits (2 epochs of 5 steps), writing to ``tmp_path / name``, quiet; ``overrides`` replace fields."""
    from gspn.recipes.classification import ClassificationConfig

    fields: dict[str, Any] = dict(
        model="baseline_conv",
        model_args=dict(TINY_CONV),
        data="digits",
        output_dir=str(tmp_path / name),
        image_size=16,
        epochs=2,
        batch_size=32,
        lr=3e-3,
        warmup_epochs=0.5,
        train_limit=160,
        val_limit=64,
        workers=0,
        progress=False,
        plot=False,
        quiet=True,
    )
    fields.update(overrides)
    return ClassificationConfig(**fields)


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Two state dicts hold the same keys and bit-identical tensors."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


TINY_DIT_MODEL_ARGS = ("hidden_size=32", "depth=2", "d_state=4", "num_global_blocks=1")


def tiny_dit_argv(
    out: str | os.PathLike[str], *extra: str, model_args: tuple[str, ...] = TINY_DIT_MODEL_ARGS
) -> list[str]:
    """``gspn train-dit`` on 8×8 digits with a 3-block ``gspn_dit_tiny`` (fast on CPU), batch 8, no
    sampling and no progress bar, writing to ``out``; ``extra`` flags are appended."""
    argv = ["train-dit", "--model", "gspn_dit_tiny", "--image-size", "8", "--batch-size", "8"]
    argv += ["--output-dir", str(out), "--no-progress", "--sample-steps", "0"]
    for arg in model_args:
        argv += ["--model-arg", arg]
    return [*argv, *extra]
