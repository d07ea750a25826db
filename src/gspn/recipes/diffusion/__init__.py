"""Class-conditional diffusion with GSPN-DiT: configs and maths on the kit's runner.

* :class:`DiTTrainConfig` + :func:`.train.run` — ``gspn train-dit``: train a GSPN-DiT on digits, an
  ImageFolder or VAE latents (one runner unit per optimizer step; exact resume);
* :class:`SampleConfig` + :func:`.sample.run` — ``gspn sample``: images from a checkpoint (a job);
* :class:`ExtractLatentsConfig` + :func:`.latents.run` — ``gspn extract-latents``: encode a dataset with
  a diffusers ``AutoencoderKL`` (a job);
* :mod:`.gaussian` — the loss and the sampling loop on diffusers' schedulers (``pip install diffusers``);
  :mod:`.data` — the datasets; :mod:`.fid` — FID/IS with a user-provided feature extractor.
"""

from .gaussian import SAMPLERS, diffusion_loss, make_sampling_scheduler, make_train_scheduler, sample_loop
from .latents import ExtractLatentsConfig, ExtractLatentsRecipe
from .sample import SampleConfig, SampleRecipe, generate, load_for_sampling
from .train import DiTTrainConfig, DiTTrainRecipe

__all__ = [
    "SAMPLERS",
    "DiTTrainConfig",
    "DiTTrainRecipe",
    "ExtractLatentsConfig",
    "ExtractLatentsRecipe",
    "SampleConfig",
    "SampleRecipe",
    "diffusion_loss",
    "generate",
    "load_for_sampling",
    "make_sampling_scheduler",
    "make_train_scheduler",
    "sample_loop",
]
