"""Class-conditional diffusion with GSPN-DiT: training, sampling, latents and FID utilities.

Commands (:mod:`gspn.commands`): ``gspn train-dit`` (:mod:`gspn.diffusion.train`), ``gspn sample``
(:mod:`gspn.diffusion.sample`), ``gspn extract-latents`` (:mod:`gspn.diffusion.latents`).

The diffusion maths (noise schedule, DDPM/DDIM/DPM-Solver steps) come from ``diffusers``
(``pip install diffusers``); see :mod:`gspn.diffusion.gaussian` for the loss.
"""

from .gaussian import SAMPLERS, diffusion_loss, make_sampling_scheduler, make_train_scheduler, sample_loop

__all__ = ["SAMPLERS", "diffusion_loss", "make_sampling_scheduler", "make_train_scheduler", "sample_loop"]
