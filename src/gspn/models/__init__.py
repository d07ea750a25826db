"""TEMPORARY stand-in for :mod:`gspn.models` (training branch, issue 4).

The real package — ``GSPN2d``-based backbones, ``gspn_micro``/``gspn_t``/``gspn_s``/``gspn_b`` and the
timm-style registry — is built on another branch. This file only provides the registry interface the
trainer is coded against so that the trainer can be developed and tested in isolation:

* ``create_model(name, pretrained=False, num_classes=..., in_chans=..., **overrides)``
* ``list_models(pattern="*")``
* ``register_model(fn)``

plus one tiny convolutional model, ``standin_tiny``. **The integrator replaces this whole file with the
real ``gspn.models`` package when the branches merge**; nothing in ``gspn.train`` or the tests relies on
``standin_tiny`` existing.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["create_model", "list_models", "register_model"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model constructor under its function name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Names of the registered models matching a shell-style ``pattern``."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def create_model(
    name: str, pretrained: bool = False, num_classes: int = 1000, in_chans: int = 3, **overrides: Any
) -> nn.Module:
    """Build a registered model by name."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    if pretrained:
        raise ValueError("the stand-in registry has no pretrained weights")
    return _REGISTRY[name](num_classes=num_classes, in_chans=in_chans, **overrides)


class _StandinTiny(nn.Module):
    """Two conv layers, global pooling and a linear head."""

    def __init__(self, num_classes: int, in_chans: int, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)
        self.default_cfg = {
            "input_size": (in_chans, 32, 32),
            "mean": (0.5,) * in_chans,
            "std": (0.5,) * in_chans,
            "num_classes": num_classes,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for images ``(B, C, H, W)``."""
        return self.head(self.features(x))


@register_model
def standin_tiny(num_classes: int = 1000, in_chans: int = 3, width: int = 16) -> nn.Module:
    """Tiny stand-in conv net (temporary; see the module docstring)."""
    return _StandinTiny(num_classes, in_chans, width)
