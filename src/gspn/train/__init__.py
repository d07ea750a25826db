"""Training and evaluation for GSPN classifiers (``gspn train`` / ``gspn eval``).

* :class:`TrainConfig` + :func:`run` (alias :func:`train`) — the classification recipe on the training kit
  :mod:`gspn.training_utils`: AdamW, cosine schedule with warm-up, label smoothing, gradient
  clipping, AMP on CUDA, optional EMA, atomic per-epoch checkpoints with exact ``--resume``, JSON-lines
  metrics with a PNG plot, DDP under ``torchrun``.
* :func:`evaluate_checkpoint` — loss/accuracy of a saved checkpoint.
* :func:`build_model` — the ``gspn.models`` registry plus the training baselines
  (``baseline_vit``, ``baseline_conv``).
"""

from ..datasets import build_data
from .baselines import BASELINES, count_params, match_params
from .factory import available_models, build_model, model_task, parse_model_args
from .trainer import TrainConfig, evaluate, evaluate_checkpoint, run, train, weights_digest

__all__ = [
    "BASELINES",
    "TrainConfig",
    "available_models",
    "build_data",
    "build_model",
    "count_params",
    "evaluate",
    "evaluate_checkpoint",
    "match_params",
    "model_task",
    "parse_model_args",
    "run",
    "train",
    "weights_digest",
]
