"""``gspn distill-encoder``: distil an attention ViT teacher into an isotropic GSPN encoder (C-GSPN's two
stages; the recipe is :mod:`gspn.distill_encoder`)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from . import _flags as F

__all__ = ["distill_encoder_config", "register"]

_DESCRIPTION = (
    "Distil an attention encoder (e.g. a vit_nano trained with `gspn train`) into an isotropic GSPN encoder "
    "(gspn_vit_*), in C-GSPN's two stages: per-layer supervision of every block, then end-to-end alignment of "
    "the final features (+ logit KD and labels). Launch with torchrun for DDP."
)


def register(sub: Any) -> None:
    """Add ``distill-encoder`` to the ``gspn`` sub-parsers."""
    p = sub.add_parser(
        "distill-encoder",
        help="distil an attention ViT into a GSPN encoder (two stages)",
        description=_DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_arguments(p)
    p.set_defaults(func=_cmd, _required=("teacher",))


def distill_encoder_config(args: argparse.Namespace) -> Any:
    """The :class:`~gspn.distill_encoder.EncoderDistillConfig` of parsed ``distill-encoder`` flags."""
    from ..distill_encoder.trainer import EncoderDistillConfig

    return F.config_from_args(EncoderDistillConfig, args, verbose=not args.quiet)


def _cmd(args: argparse.Namespace) -> int:
    from ..distill_encoder.trainer import run

    summary = run(distill_encoder_config(args))
    if args.quiet:
        print(json.dumps({k: summary[k] for k in ("best_acc", "epochs_done", "output")}))
    return 0


def _add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("teacher and student")
    g.add_argument(
        "--teacher",
        default=None,
        metavar="PATH",
        help="the attention teacher: a model.safetensors written by `gspn train` (or its run folder); "
        "its data setup (image size, channels, mean/std) is used",
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
    g.add_argument("--workers", type=int, default=2, help="DataLoader worker processes per training process")
    g.add_argument("--train-limit", type=int, default=None, help="use only this many training images")
    g.add_argument("--val-limit", type=int, default=None, help="use only this many validation images")
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
    g.add_argument("--label-smoothing", type=float, default=0.1)
    g.add_argument(
        "--init-from-teacher",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start the student's patch embedding and head from the teacher's where the shapes match",
    )
    g = p.add_argument_group("optimisation (per stage: AdamW, warm-up then cosine)")
    F.add_batch_size(g, 64, "per process")
    g.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    g.add_argument("--min-lr", type=float, default=1e-5, help="final learning rate of each stage's cosine")
    g.add_argument("--weight-decay", type=float, default=0.05)
    F.add_warmup_epochs(g, 1.0)
    F.add_clip_grad(g, 1.0)
    F.add_precision(
        g,
        ("auto", "fp32", "bf16", "fp16"),
        "auto",
        help="mixed precision on CUDA (auto: bf16 if supported, else fp16 with a grad scaler)",
    )
    g = p.add_argument_group("run")
    F.add_output_dir(g, "runs/distill-encoder", "checkpoints, metrics and the student's model.safetensors")
    F.add_resume(g)
    F.add_overwrite(g)
    F.add_stop_after_epochs(g, "stop after N epochs of this invocation; --resume continues")
    g.add_argument("--seed", type=int, default=0)
    F.add_device(g, help="auto | cpu | cuda | cuda:N (torchrun: auto and cuda are cuda:LOCAL_RANK)")
    g.add_argument("--dist-backend", default=None, help="torch.distributed backend (default: nccl on GPU, gloo on CPU)")
    F.add_threads(g)
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.add_argument("--no-plot", dest="plot", action="store_false", help="do not draw metrics.png")
    g.add_argument("--quiet", action="store_true", help="no per-epoch log lines; print the summary as JSON")
