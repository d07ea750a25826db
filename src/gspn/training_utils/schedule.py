"""Learning-rate schedules: a :class:`torch.optim.lr_scheduler.LambdaLR` with linear warm-up.

``build_lr_scheduler(optimizer, "cosine", total_steps, warmup_steps, min_lr_ratio)`` multiplies each
group's base LR, at optimizer step ``s`` (after ``s`` calls of ``scheduler.step()``), by
:func:`lr_factor`: ``(s + 1) / warmup_steps`` during warm-up, then ``1`` (``"constant"``) or a cosine
from ``1`` down to ``min_lr_ratio`` at ``total_steps`` (``"cosine"``). Its state dict resumes exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["SCHEDULES", "build_lr_scheduler", "lr_factor"]

SCHEDULES = ("constant", "cosine")


def lr_factor(
    step: int, kind: str = "cosine", total_steps: int = 1, warmup_steps: int = 0, min_lr_ratio: float = 0.0
) -> float:
    """The LR multiplier at optimizer step ``step`` (see the module docstring)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def schedule_fn(
    kind: str, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0
) -> Callable[[int], float]:
    """:func:`lr_factor` with everything but the step bound (the ``lr_lambda`` of :func:`build_lr_scheduler`)."""
    if kind not in SCHEDULES:
        raise ValueError(f"LR schedule must be one of {', '.join(SCHEDULES)}, not {kind!r}")

    def factor(step: int) -> float:  # a plain function: LambdaLR's state dict then stores nothing of it
        return lr_factor(step, kind, total_steps, warmup_steps, min_lr_ratio)

    return factor


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    kind: str = "cosine",
    total_steps: int = 1,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over ``optimizer`` following :func:`lr_factor`; call ``.step()`` after each
    ``optimizer.step()``. Build it before loading the optimizer's state when resuming."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_fn(kind, total_steps, warmup_steps, min_lr_ratio))
