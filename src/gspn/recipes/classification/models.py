"""Model construction for the trainer: the ``gspn.models`` registry plus the training baselines.

The trainer depends on three things from :mod:`gspn.models`: ``create_model(name, num_classes=,
in_chans=, **overrides)``, ``list_models()`` and ``get_default_cfg(name)`` (its ``"task"`` tells
classifiers from diffusion models); and, optionally, a model's ``default_cfg`` dict (``input_size``,
``mean``, ``std``, ``num_classes``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["available_models", "build_model", "model_default_cfg", "model_task"]


def build_model(name: str, num_classes: int, in_chans: int = 3, **overrides: Any) -> nn.Module:
    """Build classifier ``name`` from the baselines or from the :mod:`gspn.models` registry.

    Raises:
        ValueError: ``name`` is unknown, or a diffusion model (those take ``gspn train-dit``).
    """
    from ...models import create_model

    task = model_task(name)
    if task != "classification":
        raise ValueError(f"model {name!r} is a {task} model, not a classifier: train it with `gspn train-dit`")
    return create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **overrides)


def model_task(name: str) -> str:
    """``"classification"`` (backbones and baselines) or ``"diffusion"`` (GSPN-DiT), from the
    model's default config; unknown names raise the registry's ``ValueError``."""
    from ...models import get_default_cfg

    return get_default_cfg(name).get("task", "classification")


def available_models(task: str | None = "classification") -> list[str]:
    """The registry's models of ``task`` (``None``: all), then, for classification, the baselines:
    for ``"classification"``, every name :func:`build_model` accepts."""
    from ...models import list_models

    return list_models(task=task)


def model_default_cfg(model: nn.Module) -> dict[str, Any]:
    """The model's ``default_cfg`` (an empty dict when it has none)."""
    cfg = getattr(model, "default_cfg", None)
    return dict(cfg) if isinstance(cfg, dict) else {}
