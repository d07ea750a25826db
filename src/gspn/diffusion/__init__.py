"""Class-conditional diffusion with GSPN-DiT: training, sampling, latents and FID utilities.

Entry points (also registered as ``gspn train-dit``, ``gspn sample``, ``gspn extract-latents``):

* ``python -m gspn.diffusion.train``   — :mod:`gspn.diffusion.train`
* ``python -m gspn.diffusion.sample``  — :mod:`gspn.diffusion.sample`
* ``python -m gspn.diffusion.latents`` — :mod:`gspn.diffusion.latents`

The diffusion maths (noise schedule, DDPM/DDIM/DPM-Solver steps) come from ``diffusers``
(``pip install diffusers``); see :mod:`gspn.diffusion.gaussian` for the loss.
"""

from .gaussian import SAMPLERS, diffusion_loss, make_sampling_scheduler, make_train_scheduler, sample_loop

__all__ = ["SAMPLERS", "diffusion_loss", "make_sampling_scheduler", "make_train_scheduler", "sample_loop"]
