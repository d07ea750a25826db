"""Distillation of GSPN-swapped diffusion UNets (``gspn distill``).

See :mod:`gspn.distill.trainer` for the method, :mod:`gspn.distill.command` for the run and
:mod:`gspn.commands.diffusers` for the options.
Needs the ``gspn[diffusers]`` extra; importing this package does not import diffusers.
"""

from __future__ import annotations

from .command import config_from_args, run_distill

__all__ = ["config_from_args", "run_distill"]
