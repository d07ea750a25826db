"""Classification (``gspn train`` / ``gspn eval``): a config and its maths on the kit's runner.

* :class:`ClassificationConfig` + :func:`run` — supervised training of a registered classifier: AdamW,
  cosine schedule with warm-up, label smoothing, gradient clipping, AMP on CUDA, optional EMA, DDP under
  ``torchrun``; the runner (:func:`gspn.training_utils.run`) gives it exact resume, the non-finite guard,
  the metrics log and the one training-state format.
* :func:`evaluate_checkpoint` — loss/accuracy of a saved training state.
* :func:`build_model` — a registered classifier (the GSPN families and the baselines).
"""

from .evaluate import evaluate_checkpoint
from .models import available_models, build_model, model_default_cfg, model_task
from .train import ClassificationConfig, ClassificationRecipe, run

__all__ = [
    "ClassificationConfig",
    "ClassificationRecipe",
    "available_models",
    "build_model",
    "evaluate_checkpoint",
    "model_default_cfg",
    "model_task",
    "run",
]
