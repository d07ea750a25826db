"""High-resolution text-to-image with a GSPN-swapped UNet: the pipeline pieces of ``gspn generate``.

:func:`load_pipeline` reads a diffusers pipeline, :func:`prepare_pipeline` sets it up for large sizes,
:func:`generate` runs it (the command's recipe is :mod:`gspn.recipes.text_to_image`).

What makes large sizes fit:

* the swapped self-attention is GSPN, linear in the number of latent positions;
* the remaining cross-attention runs through :class:`~gspn.integrations.diffusers.ChunkedAttnProcessor`
  (exact softmax over chunks of queries; diffusers' ``enable_attention_slicing`` is *not* used
  because it would also replace the GSPN processors);
* the VAE decodes in tiles (``vae.enable_tiling()``).

Optional low→high path (``upscale_from``): generate at the first size, then for each further size and
finally the target, upsample the latents bicubically and refine them with the img2img pipeline built
from the same components (``strength`` of the re-noising), as the paper's progressive high-resolution
scripts do (e.g. 512 → 1K → 2K).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["generate", "load_pipeline", "prepare_pipeline"]


def load_pipeline(model: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Any:
    """A diffusers text-to-image pipeline from a local folder or a hub name, without safety checker, on
    ``device`` (in ``dtype`` if given, else as saved).

    Hub names resolve through the local Hugging Face cache; set ``HF_HUB_OFFLINE=1`` to forbid any
    network access.
    """
    from diffusers import DiffusionPipeline

    kwargs: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype (FutureWarning)
        warnings.simplefilter("ignore", FutureWarning)
        pipe = DiffusionPipeline.from_pretrained(model, **kwargs)
    return pipe.to(device)


def prepare_pipeline(
    pipe: Any,
    adapter: Any = None,
    *,
    cross_attention_chunk: int | None = 4096,
    vae_tiling: bool = True,
) -> Any:
    """Mount ``adapter`` (a :class:`GSPNAdapter`, a path to one, or ``None``) and set up a pipeline
    for large sizes (chunked cross-attention, tiled VAE decoding). Returns ``pipe``."""
    from .diffusers import GSPNAdapter, enable_chunked_cross_attention

    if isinstance(adapter, (str, Path)):
        adapter = GSPNAdapter.from_pretrained(str(adapter))
    if adapter is not None:
        adapter.mount(pipe)
    if cross_attention_chunk:
        enable_chunked_cross_attention(pipe, cross_attention_chunk)
    if vae_tiling and getattr(pipe, "vae", None) is not None and hasattr(pipe.vae, "enable_tiling"):
        pipe.vae.enable_tiling()
    return pipe


def generate(
    pipe: Any,
    prompt: str | list[str],
    *,
    height: int,
    width: int,
    steps: int = 30,
    guidance: float = 7.5,
    seed: int = 0,
    negative_prompt: str | None = None,
    upscale_from: tuple[int, int] | Sequence[tuple[int, int]] | None = None,
    strength: float = 0.6,
    skip_residual: float = 0.0,
    output_type: str = "pil",
    **call_kwargs: Any,
) -> Any:
    """Images of ``height × width`` from a prepared pipeline (see :func:`prepare_pipeline`).

    With ``upscale_from=(h, w)`` the image is first generated at ``h × w``; its latents are
    upsampled to the target size and refined by img2img at ``strength``. A list of sizes makes a
    progressive chain (first size generated, every later size and the target refined).
    ``skip_residual=α > 0`` adds DemoFusion-style skip residuals to each refinement: after every
    denoising step the latents are blended with the upsampled reference noised to the same
    timestep, with weight ``((1 + cos(π (T − t) / T)) / 2)^α`` (1 at pure noise, 0 at the end;
    DemoFusion uses α = 3). ``call_kwargs`` go to the pipeline call(s) (e.g. ``prompt_embeds``).
    Returns the pipeline's ``.images``.
    """
    device = getattr(pipe, "device", torch.device("cpu"))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    common = {"num_inference_steps": steps, "guidance_scale": guidance, "generator": gen, **call_kwargs}
    if negative_prompt is not None:
        common["negative_prompt"] = negative_prompt
    if prompt is not None and "prompt_embeds" not in call_kwargs:
        common["prompt"] = prompt
    if upscale_from is None:
        return pipe(height=height, width=width, output_type=output_type, **common).images
    from diffusers import AutoPipelineForImage2Image

    sizes = [tuple(upscale_from)] if isinstance(upscale_from[0], int) else [tuple(v) for v in upscale_from]
    sizes.append((height, width))
    latents = pipe(height=sizes[0][0], width=sizes[0][1], output_type="latent", **common).images
    factor = getattr(pipe, "vae_scale_factor", 8)
    img2img = AutoPipelineForImage2Image.from_pipe(pipe)
    img2img.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))  # as the caller set it
    for stage, (h, w) in enumerate(sizes[1:], start=1):
        latents = F.interpolate(
            latents.float(), size=(h // factor, w // factor), mode="bicubic", align_corners=False
        ).to(latents.dtype)
        common["generator"] = torch.Generator(device="cpu").manual_seed(seed + stage)
        last = stage == len(sizes) - 1
        extra = {}
        if skip_residual > 0:
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed + 1000 + stage))
            blend = _skip_residual(latents.to(device), noise.to(device, latents.dtype), skip_residual)
            extra = {"callback_on_step_end": blend, "callback_on_step_end_tensor_inputs": ["latents"]}
        latents = img2img(
            image=latents.to(device),
            strength=strength,
            output_type=output_type if last else "latent",
            **common,
            **extra,
        ).images
    return latents


def _skip_residual(reference: torch.Tensor, noise: torch.Tensor, alpha: float) -> Any:
    """A ``callback_on_step_end`` blending the latents with ``reference`` noised to the next timestep."""

    def callback(pipe: Any, step: int, timestep: torch.Tensor, kwargs: dict[str, Any]) -> dict[str, Any]:
        timesteps = pipe.scheduler.timesteps
        where = (timesteps == timestep).nonzero()
        if len(where) == 0 or int(where[0]) + 1 >= len(timesteps):
            return kwargs  # the last step: nothing left to blend towards
        t_next = timesteps[int(where[0]) + 1].reshape(1)
        total = pipe.scheduler.config.num_train_timesteps
        weight = ((1 + math.cos(math.pi * (total - float(t_next)) / total)) / 2) ** alpha
        latents = kwargs["latents"]
        noised = pipe.scheduler.add_noise(reference, noise, t_next.to(reference.device)).to(latents.dtype)
        kwargs["latents"] = weight * noised + (1 - weight) * latents
        return kwargs

    return callback
