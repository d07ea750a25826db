"""Distillation of GSPN-swapped diffusion UNets (``gspn distill``): the distillation recipe.

:class:`DistillConfig` + :func:`run` (in :mod:`gspn.distill.trainer`, with the method); the flags are
in :mod:`gspn.commands.diffusers`. Needs the ``gspn[diffusers]`` extra; importing this package does not
import diffusers (the names below load on first use).
"""

from __future__ import annotations

from typing import Any

__all__ = ["DistillConfig", "Distiller", "run", "run_distill"]


def __getattr__(name: str) -> Any:
    if name in ("DistillConfig", "Distiller", "run"):
        from . import trainer

        return getattr(trainer, name)
    if name == "run_distill":  # the former name of ``run``
        from .trainer import run

        return run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
