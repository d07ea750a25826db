"""``gspn distill`` and ``gspn generate`` (diffusers UNets with GSPN attention)."""

from __future__ import annotations

import argparse
from typing import Any

from . import _flags as F

__all__ = ["register"]


def _optional_int(s: str) -> int | None:
    return None if s.lower() in ("none", "global", "0") else int(s)


def _size(s: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in s.lower().replace("*", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH, got {s!r}") from None
    return h, w


def register(sub: Any) -> None:
    """Add ``distill`` and ``generate`` to the ``gspn`` sub-parsers."""
    F.add_recipe_command(
        sub,
        "distill",
        "distil a GSPN-swapped diffusion UNet from the original",
        _add_distill,
        "recipes.unet_distillation",
        "UNetDistillationConfig",
    )
    F.add_recipe_command(
        sub,
        "generate",
        "high-resolution text-to-image with a GSPN adapter",
        _add_generate,
        "recipes.text_to_image",
        "GenerateConfig",
        description="High-resolution text-to-image with a GSPN-swapped UNet.",
    )


def _add_distill(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and data")
    g.add_argument(
        "--model",
        required=True,
        help="diffusers pipeline folder or hub name (resolved from the local HF cache; "
        "HF_HUB_OFFLINE=1 forbids downloads)",
    )
    g.add_argument(
        "--captions",
        required=True,
        help="caption file (one per line) or image-caption folder (<img> + <img>.txt, "
        "or metadata.jsonl with file_name/text)",
    )
    F.add_output_dir(g, "gspn-distill", "last.pt, metrics.jsonl and adapter/ go here")
    g.add_argument("--init-adapter", default=None, help="start from this saved GSPN adapter")
    F.add_image_size(g, 512, "training resolution in pixels (square)")
    g.add_argument(
        "--caption-dropout",
        type=float,
        default=0.0,
        help="probability of an empty caption (keeps classifier-free guidance working)",
    )
    g = parser.add_argument_group("GSPN layers")
    g.add_argument("--d-state", type=int, default=8, help="GSPN proxy dimension")
    g.add_argument("--expand", type=float, default=1.0, help="GSPN inner width / layer width")
    g.add_argument("--kernel-size", type=int, default=3, help="depthwise conv before the scan (0: none)")
    g.add_argument(
        "--chunk-size",
        type=_optional_int,
        default=None,
        help="local GSPN tile size in lines (the paper uses 4); 'none' = global",
    )
    g.add_argument("--gate-channels", type=_optional_int, default=None, help="shared gate channels")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=1000, help="total optimisation steps")
    F.add_batch_size(g, 1, "per process")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--weight-decay", type=float, default=0.0)
    F.add_warmup_steps(g, 0)
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant")
    F.add_clip_grad(g, 1.0)
    g.add_argument("--noise-weight", type=float, default=1.0, help="weight of MSE(student, ε/v target)")
    g.add_argument("--output-weight", type=float, default=0.5, help="weight of MSE(student, teacher)")
    g.add_argument(
        "--feature-weight",
        type=float,
        default=0.5,
        help="weight of the mean per-layer MSE of the swapped layers' outputs (0: no hooks)",
    )
    F.add_precision(g, ("fp32", "bf16"), "fp32", "autocast precision of the forward passes")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--train-all", action="store_true", help="train the whole UNet (the teacher is then a frozen copy)")
    g = parser.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--save-every", type=int, default=500, help="training-state period in steps (0: at the end only)")
    g.add_argument("--log-every", type=int, default=10, help="metrics record and log line period in steps")
    F.add_resume(g)
    F.add_threads(g)
    F.add_device(g, help="auto | cpu | cuda | cuda:N (torchrun: auto and cuda are cuda:LOCAL_RANK)")
    F.add_run_output(g, quiet=True)


def _add_generate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--height", type=int, default=1024, help="pixels (a multiple of 8·2^levels)")
    parser.add_argument("--width", type=int, default=1024, help="pixels")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    parser.add_argument(
        "--model",
        default="stable-diffusion-v1-5/stable-diffusion-v1-5",
        help="diffusers pipeline folder or hub name (from the local HF cache; HF_HUB_OFFLINE=1 forbids downloads)",
    )
    parser.add_argument(
        "--adapter", default=None, help="saved GSPN adapter folder (without it the original attention runs)"
    )
    parser.add_argument(
        "--upscale-from",
        type=_size,
        nargs="+",
        default=None,
        metavar="HxW",
        help="generate at the first size, then upsample the latents and refine (img2img) "
        "at each further size and the target",
    )
    parser.add_argument("--strength", type=float, default=0.6, help="img2img strength of the upscaling pass")
    parser.add_argument(
        "--skip-residual",
        type=float,
        default=0.0,
        metavar="ALPHA",
        help="DemoFusion-style skip residuals in the upscaling passes (0: off; DemoFusion 3)",
    )
    parser.add_argument(
        "--cross-attn-chunk",
        type=int,
        default=4096,
        help="queries per cross-attention chunk (0: diffusers' default processor)",
    )
    parser.add_argument(
        "--vae-tiling", action=argparse.BooleanOptionalAction, default=True, help="decode the latents in tiles"
    )
    F.add_precision(
        parser, ("auto", "fp32", "fp16", "bf16"), "auto", "the pipeline's dtype (auto: fp16 on CUDA, fp32 on CPU)"
    )
    F.add_device(parser)
    F.add_output_dir(parser, "generated", "image.png (image_<i>.png for several) and summary.json go here")
    parser.add_argument("--overwrite", action="store_true", help="replace the images already in the output directory")
    F.add_threads(parser)
    F.add_run_output(parser)
