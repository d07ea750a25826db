"""``gspn distill-encoder``: distil an attention ViT teacher into an isotropic GSPN encoder (C-GSPN's two
stages; the recipe is :mod:`gspn.recipes.encoder_distillation`)."""

from __future__ import annotations

import argparse
from typing import Any

from . import _flags as F

__all__ = ["register"]

_DESCRIPTION = (
    "Distil an attention encoder (e.g. a vit_nano trained with `gspn train`) into an isotropic GSPN encoder "
    "(gspn_vit_*), in C-GSPN's two stages: per-layer supervision of every block, then end-to-end alignment of "
    "the final features (+ logit KD and labels). Launch with torchrun for DDP."
)


def register(sub: Any) -> None:
    """Add ``distill-encoder`` to the ``gspn`` sub-parsers."""
    F.add_recipe_command(
        sub,
        "distill-encoder",
        "distil an attention ViT into a GSPN encoder (two stages)",
        _add_arguments,
        "recipes.encoder_distillation",
        "EncoderDistillationConfig",
        description=_DESCRIPTION,
    )


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from ..recipes.encoder_distillation import EncoderDistillationConfig

    g = p.add_argument_group("teacher and student")
    g.add_argument(
        "--teacher",
        required=True,
        metavar="PATH",
        help="the attention teacher: a model.safetensors written by `gspn train`, its run folder, or its "
        "last.pt / best.pt; its data setup (image size, channels, mean/std) is used",
    )
    g.add_argument(
        "--model",
        default="gspn_vit_nano",
        help="registered student (same patch size as the teacher: vit_nano -> gspn_vit_nano)",
    )
    F.add_model_args(g)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="digits", help="'digits' (bundled) or an ImageFolder root with train/ and val/")
    F.add_image_size(g, None, "input side (default: the teacher's)")
    F.add_in_channels(g, None, "input channels (default: the teacher's)")
    data = g
    g = p.add_argument_group("stages and losses")
    g.add_argument("--epochs", type=int, default=10, help="total epochs of both stages")
    g.add_argument(
        "--stage1-epochs", type=int, default=3, help="epochs of stage 1 (per-layer supervision); stage 2 runs the rest"
    )
    g.add_argument(
        "--stage1-inputs",
        choices=("student", "teacher"),
        default="student",
        help="stage 1: every student block on the student's own features, or on the teacher's previous "
        "block output (independent drop-in blocks; gspn_vit students of the teacher's shape)",
    )
    g.add_argument(
        "--feature-loss",
        choices=("nmse", "mse"),
        default="nmse",
        help="feature distance: MSE normalised by the target's mean square, or plain MSE",
    )
    g.add_argument(
        "--feature-weight", type=float, default=0.0, help="stage 2: weight of the per-layer term of stage 1 (0: off)"
    )
    g.add_argument("--output-weight", type=float, default=1.0, help="stage 2: weight of the final-feature alignment")
    g.add_argument("--kd-weight", type=float, default=1.0, help="stage 2: weight of the logit KD term")
    g.add_argument("--kd-temperature", type=float, default=2.0, help="softmax temperature of the KD term")
    g.add_argument("--label-weight", type=float, default=1.0, help="stage 2: weight of the label cross-entropy")
    g.add_argument(
        "--init-from-teacher",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start the student's patch embedding and head from the teacher's where the shapes match",
    )
    optimisation = p.add_argument_group("optimisation (per stage: AdamW, warm-up then cosine)")
    g = p.add_argument_group("run")
    F.add_output_dir(g, "runs/distill-encoder", "checkpoints, metrics and the student's model.safetensors")
    F.add_epoch_training(data, optimisation, g, EncoderDistillationConfig)
