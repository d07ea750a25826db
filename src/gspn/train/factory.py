"""Model construction for the trainer: the ``gspn.models`` registry plus the training baselines.

The trainer depends on exactly two things from :mod:`gspn.models`: ``create_model(name, num_classes=,
in_chans=, **overrides)`` and ``list_models()``; and, optionally, a model's ``default_cfg`` dict
(``input_size``, ``mean``, ``std``, ``num_classes``).
"""

from __future__ import annotations

import ast
from typing import Any

from torch import nn

from .baselines import BASELINES

__all__ = ["available_models", "build_model", "model_default_cfg", "parse_model_args"]


def build_model(name: str, num_classes: int, in_chans: int = 3, **overrides: Any) -> nn.Module:
    """Build ``name`` from the baselines or from the :mod:`gspn.models` registry."""
    if name in BASELINES:
        return BASELINES[name](num_classes=num_classes, in_chans=in_chans, **overrides)
    from ..models import create_model

    return create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **overrides)


def available_models() -> list[str]:
    """All names :func:`build_model` accepts: the registry's models, then the baselines."""
    from ..models import list_models

    return [*list_models(), *BASELINES]


def model_default_cfg(model: nn.Module) -> dict[str, Any]:
    """The model's ``default_cfg`` (an empty dict when it has none)."""
    cfg = getattr(model, "default_cfg", None)
    return dict(cfg) if isinstance(cfg, dict) else {}


def parse_model_args(items: list[str] | None) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` strings; values are Python literals when they parse as one, else strings.

    >>> parse_model_args(["depth=2", "depths=(1,1)", "act=gelu"])
    {'depth': 2, 'depths': (1, 1), 'act': 'gelu'}
    """
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"model argument {item!r} is not KEY=VALUE")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out
