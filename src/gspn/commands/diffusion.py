"""``gspn train-dit``, ``gspn sample``, ``gspn extract-latents`` (class-conditional GSPN-DiT).

Each command maps its flags to the recipe config of :mod:`gspn.recipes.diffusion` by name and runs it on
the kit's runner: ``run(F.config_from_args(Config, args))``.
"""

from __future__ import annotations

import argparse
from typing import Any

from . import _flags as F

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add ``train-dit``, ``sample`` and ``extract-latents`` to the ``gspn`` sub-parsers."""
    F.add_recipe_command(
        sub,
        "train-dit",
        "train a class-conditional GSPN-DiT (digits, ImageFolder or latents)",
        _add_train_dit,
        "recipes.diffusion.train",
        "DiTTrainConfig",
    )
    help_ = "sample images from a GSPN-DiT checkpoint"
    F.add_recipe_command(sub, "sample", help_, _add_sample, "recipes.diffusion.sample", "SampleConfig")
    F.add_recipe_command(
        sub,
        "extract-latents",
        "encode a dataset with a diffusers AutoencoderKL",
        _add_extract_latents,
        "recipes.diffusion.latents",
        "ExtractLatentsConfig",
    )


def _add_train_dit(parser: argparse.ArgumentParser) -> None:
    from ..recipes.diffusion.gaussian import SAMPLERS

    g = parser.add_argument_group("model and data")
    g.add_argument("--model", default="gspn_dit_tiny", help="registered GSPN-DiT name (gspn.list_models('gspn_dit*'))")
    F.add_model_args(g)
    g.add_argument("--data", default="digits", help="digits | imagefolder:PATH | latents:PATH")
    F.add_image_size(g, 16, "pixel data: side after resizing")
    F.add_in_channels(g, 1, "pixel data: 1 (grey) or 3 (RGB)", choices=(1, 3))
    g.add_argument("--class-dropout", type=float, default=0.1, help="label dropout for classifier-free guidance")
    g.add_argument(
        "--learn-sigma",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also learn the variance (--no-learn-sigma: predict ε only, plain MSE, fixed variance at sampling)",
    )
    g.add_argument("--num-train-timesteps", type=int, default=1000)
    g.add_argument("--beta-schedule", default="linear", choices=("linear", "scaled_linear", "squaredcos_cap_v2"))
    o = parser.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=2000, help="total optimizer steps")
    F.add_batch_size(o, 64, "global batch size (split over processes)")
    o.add_argument("--lr", type=float, default=1e-3)
    o.add_argument("--weight-decay", type=float, default=0.0)
    F.add_warmup_steps(o, 100)
    F.add_clip_grad(o, 1.0)
    o.add_argument("--ema-decay", type=float, default=0.999)
    o.add_argument("--seed", type=int, default=0)
    r = parser.add_argument_group("run")
    F.add_output_dir(r, "runs/dit", "output folder (checkpoints, metrics, samples)")
    F.add_resume(r, "continue a run: without a value from <output-dir>/last.pt (if present), else from CHECKPOINT")
    r.add_argument("--ckpt-every", type=int, default=500, help="checkpoint period in steps")
    r.add_argument("--log-every", type=int, default=10)
    r.add_argument("--max-minutes", type=float, default=0.0, help="stop (with a checkpoint) after this wall time")
    r.add_argument("--sample-steps", type=int, default=100, help="steps of the final sample grid (0 = no grid)")
    r.add_argument("--sampler", default="ddpm", choices=SAMPLERS, help="sampler of the final grid")
    r.add_argument("--cfg-scale", type=float, default=3.0, help="guidance of the final grid")
    F.add_device(r)
    F.add_threads(r)
    F.add_run_output(r, quiet=True)


def _add_sample(parser: argparse.ArgumentParser) -> None:
    from ..recipes.diffusion.gaussian import SAMPLERS

    F.add_checkpoint(parser, "trainer checkpoint (last.pt), ema.safetensors or a reference GSPN-DiT checkpoint")
    parser.add_argument("--labels", default="all", help='e.g. "all", "0-9", "1,7", "null" (unconditional)')
    parser.add_argument("--per-label", type=int, default=1, help="images per label")
    parser.add_argument("--steps", type=int, default=100, help="sampling steps")
    parser.add_argument("--sampler", default="ddpm", choices=SAMPLERS, help="ddpm uses the learned variance")
    parser.add_argument("--cfg-scale", type=float, default=3.0, help="classifier-free guidance (1 = off)")
    parser.add_argument("--seed", type=int, default=0)
    F.add_image_size(
        parser,
        None,
        "sample size in data pixels/latents: SIDE or H W (default: training size; may be non-square)",
        nargs="+",
    )
    F.add_output_dir(parser, "samples", "output folder")
    parser.add_argument("--nrow", type=int, default=0, help="grid columns (default: number of distinct labels, ≤ 10)")
    parser.add_argument("--upscale", type=int, default=1, help="enlarge PNGs by pixel repetition")
    F.add_batch_size(parser, 64, "images per forward pass")
    F.add_ema(parser, True, "use the EMA weights (--no-ema: the raw weights)")
    parser.add_argument(
        "--model",
        default=None,
        help="reference checkpoints: registered model (default: inferred from the tensor shapes)",
    )
    F.add_model_args(parser, "reference checkpoints: constructor override (repeatable; Python literals)")
    parser.add_argument("--vae", default=None, help="AutoencoderKL (folder or hub name) to decode latents")
    parser.add_argument("--save-latents", action="store_true", help="latent models: save latents.pt, no decoding")
    parser.add_argument(
        "--fid-extractor",
        default=None,
        help="local feature extractor (.pt2 or TorchScript) for FID/IS; never downloaded",
    )
    parser.add_argument(
        "--fid-ref",
        default=None,
        help="reference for FID: a .npz with mu/sigma, or data (digits | imagefolder:PATH)",
    )
    parser.add_argument("--fid-input-size", type=int, default=299, help="extractor input side (299 = Inception)")
    F.add_device(parser)
    F.add_threads(parser)
    F.add_run_output(parser)


def _add_extract_latents(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vae", required=True, help="AutoencoderKL folder or hub name")
    parser.add_argument("--data", default="digits", help="digits | imagefolder:PATH")
    F.add_image_size(parser, 256, "side after resizing")
    F.add_in_channels(parser, 3, "1 (grey) or 3 (RGB)", choices=(1, 3))
    F.add_output_file(parser, None, "output .pt file", required=True)
    F.add_batch_size(parser, 32, "images per VAE call")
    parser.add_argument("--deterministic", action="store_true", help="use the posterior mean instead of a sample")
    parser.add_argument("--scaling-factor", type=float, default=None, help="default: the VAE config's")
    parser.add_argument("--limit", type=int, default=0, help="encode only the first N images (0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    F.add_device(parser)
    F.add_threads(parser)
    F.add_run_output(parser)
