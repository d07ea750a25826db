"""UNet distillation (``gspn distill``): a GSPN-swapped diffusers UNet learns from the original, on the kit's runner.

* :class:`UNetDistillationConfig` + :func:`run` — the run (one runner unit per optimizer step: exact resume,
  the non-finite guard, the metrics log, ``last.pt`` in the kit's one state format, the adapter folder);
* :class:`UNetDistillationRecipe` — the same from Python with an already-built pipeline or captions
  (``gspn.training_utils.run(UNetDistillationRecipe(config, pipe=..., data=...))``);
* :func:`load_captions` / :class:`CaptionData` — caption files and image-caption folders.

Needs the ``gspn[diffusers]`` extra to run; importing this package does not import diffusers.
"""

from .data import CaptionData, load_captions, load_image
from .train import ADAPTER_DIR, UNetDistillationConfig, UNetDistillationRecipe, run

__all__ = [
    "ADAPTER_DIR",
    "CaptionData",
    "UNetDistillationConfig",
    "UNetDistillationRecipe",
    "load_captions",
    "load_image",
    "run",
]
