"""Distillation of GSPN-swapped diffusion UNets (``gspn distill``, ``python -m gspn.distill``).

See :mod:`gspn.distill.trainer` for the method and :mod:`gspn.distill.command` for the options.
Needs the ``gspn[diffusers]`` extra; importing this package does not import diffusers.
"""

from __future__ import annotations

from .command import add_distill_arguments, main, run_distill

__all__ = ["add_distill_arguments", "main", "run_distill"]
