"""The ``gspn generate`` job: one high-resolution text-to-image generation with a GSPN adapter, on the kit's runner.

The pipeline is read by :func:`gspn.integrations.generate.load_pipeline`, set up for large sizes by
:func:`~gspn.integrations.generate.prepare_pipeline` (GSPN self-attention, chunked exact cross-attention,
tiled VAE decoding) and run by :func:`~gspn.integrations.generate.generate`; the runner
(:func:`gspn.training_utils.run`) checks everything before anything is written, claims the output folder,
shows one progress bar (one tick per denoising step) and writes ``summary.json``. The images are
``<output_dir>/image.png`` (``image_<i>.png`` for several).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ...training_utils import PRECISIONS, ConfigError, DistContext, Progress, Recipe, RunConfig
from ...training_utils import run as run_recipe

__all__ = ["GenerateConfig", "TextToImageRecipe", "pipeline_dtype", "run"]

IMAGE_NAME = "image.png"


@dataclass
class GenerateConfig(RunConfig):
    """One generation; each field is the ``gspn generate`` flag of its name (``gspn generate --help``).

    Fields (beyond :class:`RunConfig`'s; ``seed`` seeds the sampling):
        prompt / negative_prompt: the text (and the negative prompt of classifier-free guidance).
        height / width: the image size in pixels.
        steps / guidance: denoising steps and the guidance scale.
        model: a diffusers pipeline folder or hub name (from the local Hugging Face cache).
        adapter: a saved GSPN adapter folder (``None``: the original attention runs).
        upscale_from: ``[(h, w), ...]``: generate at the first size, then upsample the latents and refine
            (img2img at ``strength``) at each further size and the target; ``skip_residual`` ``α > 0`` adds
            DemoFusion-style skip residuals to the refinements.
        cross_attn_chunk: queries per cross-attention chunk (``0``: diffusers' default processor).
        vae_tiling: decode the latents in tiles.
        precision: the pipeline's dtype: ``auto`` (fp16 on CUDA, fp32 elsewhere), ``fp32``, ``bf16``, ``fp16``.
    """

    output_dir: str = "generated"
    prompt: str = ""
    negative_prompt: str | None = None
    height: int = 1024
    width: int = 1024
    steps: int = 30
    guidance: float = 7.5
    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    adapter: str | None = None
    upscale_from: list[tuple[int, int]] | None = None
    strength: float = 0.6
    skip_residual: float = 0.0
    cross_attn_chunk: int = 4096
    vae_tiling: bool = True
    precision: str = "auto"


def pipeline_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The pipeline's dtype for ``precision`` (the weights' dtype, not autocast): ``auto`` is fp16 on
    CUDA and fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise ConfigError("precision", f"must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def check_config(cfg: GenerateConfig) -> None:
    """Reject settings that cannot run, before anything is loaded or written (:class:`ConfigError`)."""
    if not cfg.prompt:
        raise ConfigError("prompt", "is required")
    sizes = [("height", cfg.height), ("width", cfg.width), ("steps", cfg.steps)]
    sizes += [("upscale_from", v) for hw in cfg.upscale_from or () for v in hw]
    for name, value in [*sizes, ("cross_attn_chunk", cfg.cross_attn_chunk)]:
        minimum = 0 if name == "cross_attn_chunk" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(name, f"must be an integer >= {minimum}, got {value!r}")
    for name, value, ok in (
        ("guidance", cfg.guidance, lambda v: v >= 0),
        ("strength", cfg.strength, lambda v: 0 < v <= 1),
        ("skip_residual", cfg.skip_residual, lambda v: v >= 0),
    ):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and ok(value)):
            where = "in (0, 1]" if name == "strength" else ">= 0"
            raise ConfigError(name, f"must be a finite number {where}, got {value!r}")
    pipeline_dtype(cfg.precision, torch.device("cpu"))
    if cfg.adapter and not Path(cfg.adapter).is_dir():
        raise ConfigError("adapter", f"names no saved adapter folder: {cfg.adapter}")


class TextToImageRecipe(Recipe):
    """One generation as a job of the runner (stateless, one unit; see the module docstring)."""

    command: ClassVar[str] = "generate"
    stateful: ClassVar[bool] = False
    unit: ClassVar[str] = "job"
    run_files: ClassVar[tuple[str, ...]] = (IMAGE_NAME, "summary.json")

    config: GenerateConfig

    def __init__(self, config: GenerateConfig, pipe: Any = None) -> None:
        super().__init__(config)
        self.pipe = pipe
        self.result: dict[str, Any] = {}

    def check(self) -> None:
        check_config(self.config)

    def build(self, ctx: DistContext) -> None:
        """The pipeline in its dtype on the run's device, with the adapter mounted and set up for large sizes."""
        from ...integrations.generate import load_pipeline, prepare_pipeline

        cfg = self.config
        if self.pipe is None:
            self.pipe = load_pipeline(cfg.model, ctx.device, pipeline_dtype(cfg.precision, ctx.device))
        prepare_pipeline(
            self.pipe, cfg.adapter, cross_attention_chunk=cfg.cross_attn_chunk or None, vae_tiling=cfg.vae_tiling
        )
        self.pipe.set_progress_bar_config(disable=True)  # the runner's bar counts the denoising steps

    def steps_per_unit(self) -> int:
        """Denoising steps of the job: the first size's, then ``int(steps · strength)`` per refinement."""
        cfg = self.config
        refinements = len(cfg.upscale_from or ())
        return cfg.steps + refinements * min(int(cfg.steps * cfg.strength), cfg.steps)

    def header(self) -> str:
        cfg = self.config
        upscale = " via " + " → ".join(f"{h}x{w}" for h, w in cfg.upscale_from) if cfg.upscale_from else ""
        adapter = f"adapter {cfg.adapter}" if cfg.adapter else "original attention"
        return (
            f"generate {cfg.height}x{cfg.width}{upscale}, {cfg.steps} steps: {cfg.model} with {adapter} | "
            f"{self.pipe.dtype} on {self.ctx.device.type}"
        )

    def run_unit(self, index: int, progress: Progress) -> None:
        from ...integrations.generate import generate

        cfg = self.config
        hook = self.pipe.unet.register_forward_hook(lambda *_: progress.update(1))
        try:
            start = time.perf_counter()
            images = generate(
                self.pipe,
                cfg.prompt,
                height=cfg.height,
                width=cfg.width,
                steps=cfg.steps,
                guidance=cfg.guidance,
                seed=cfg.seed,
                negative_prompt=cfg.negative_prompt,
                upscale_from=cfg.upscale_from,
                strength=cfg.strength,
                skip_residual=cfg.skip_residual,
            )
            seconds = time.perf_counter() - start
        finally:
            hook.remove()
        first = self.out / IMAGE_NAME
        paths = [
            first if len(images) == 1 else first.with_name(f"{first.stem}_{i}{first.suffix}")
            for i in range(len(images))
        ]
        if self.ctx.is_main:
            for image, path in zip(images, paths, strict=True):
                image.save(path)
        self.result = {
            "images": [str(p) for p in paths],
            "height": cfg.height,
            "width": cfg.width,
            "seconds": round(seconds, 3),
            "adapter": cfg.adapter,
        }
        return None

    def export(self, out: Path, finished: bool) -> dict[str, Any]:
        return dict(self.result)

    def closing(self, summary: dict[str, Any]) -> str:
        images = ", ".join(summary.get("images", []))
        return f"generated {images} ({self.config.width}x{self.config.height}) in {summary.get('seconds', 0):.1f}s"


def run(config: GenerateConfig) -> dict[str, Any]:
    """Generate as ``config`` says (:func:`gspn.training_utils.run` of :class:`TextToImageRecipe`); return the
    summary (also ``<output_dir>/summary.json``: image paths, size, seconds, adapter)."""
    return run_recipe(TextToImageRecipe(config))
