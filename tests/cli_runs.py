"""Command lines for tiny runs shared by the CLI tests."""

from __future__ import annotations

import os

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
