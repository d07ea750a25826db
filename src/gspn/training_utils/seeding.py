"""The one seeding rule of every recipe.

A run has one integer ``seed``. Everything random is seeded from :func:`derive_seed` of it and of where
the draw happens (optimizer ``step``, process ``rank``), so a resumed run, or another rank, derives the
same or a distinct stream without storing it; :func:`seed_all` applies a seed to Python, NumPy and torch.
"""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["derive_seed", "seed_all", "step_generator"]

_MOD = 2**63 - 1


def derive_seed(seed: int, step: int = 0, rank: int = 0) -> int:
    """The seed of ``(seed, step, rank)``: ``seed`` itself at step 0 on rank 0, distinct elsewhere."""
    return (seed + step * 1_000_003 + rank * 104_729) % _MOD


def seed_all(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_generator(seed: int, step: int = 0, rank: int = 0) -> torch.Generator:
    """A CPU :class:`torch.Generator` seeded with :func:`derive_seed` ``(seed, step, rank)``."""
    return torch.Generator().manual_seed(derive_seed(seed, step, rank))
