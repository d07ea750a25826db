"""Atomic checkpoint files and RNG-state capture for exact resumption.

A checkpoint is a plain dict of tensors and Python primitives, so it loads with
``torch.load(..., weights_only=True)``. Files are written to a temporary file in the same directory,
flushed and fsync'ed, then moved into place with :func:`os.replace`, which is atomic on POSIX and
Windows: a crash leaves either the previous file or the new one, never a truncated one.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from .._files import atomic_torch_save, atomic_write, safe_torch_load

__all__ = ["atomic_write", "capture_rng", "load_state", "restore_rng", "save_state"]


def save_state(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Atomically ``torch.save`` a training state (``last.pt``: weights, optimizer, RNG, ...) to ``path``.

    Weights for use elsewhere are written by :func:`gspn.models.save_checkpoint` (safetensors)."""
    atomic_torch_save(state, path)


def load_state(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a training state written by :func:`save_state` (tensors and primitives only; never runs code)."""
    return safe_torch_load(path, map_location=map_location)


def capture_rng(loader_generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG state a training step can touch: torch (CPU, CUDA), NumPy, Python, the data loader."""
    key, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "key": key,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
        "loader": loader_generator.get_state() if loader_generator is not None else None,
    }


def restore_rng(state: dict[str, Any], loader_generator: torch.Generator | None = None) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        cuda = [s.cpu() for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    np.random.set_state(
        (n["key"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if loader_generator is not None and state.get("loader") is not None:
        loader_generator.set_state(state["loader"].cpu())
