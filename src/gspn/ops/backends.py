"""Backend registry for the line scan.

Every backend is a module exposing

* ``is_available(device) -> bool``
* ``scan(x, lam, w_left, w_mid, w_right, *, direction, chunk_size, normalize, out)``
* ``scan_backward(grad, h, x, lam, w_left, w_mid, w_right, *, direction, chunk_size, normalize,
  dx, accumulate_dx, d_params)``: writes (or, with ``accumulate_dx``, adds) ``dL/dx`` into ``dx``
  and the full-size ``(B, C, H, W)`` gradients of ``lam, w_left, w_mid, w_right`` into the four
  ``d_params`` buffers (possibly strided views, e.g. one direction of a ``(B, 4, C, H, W)`` buffer)
* optionally ``allocate(shape, dtype, device)`` for output buffers

and receives tensors already validated, in the accumulation dtype (float32/float64), with H and W
contiguous; parameters keep their compact broadcast shapes. ``"auto"`` picks the fastest backend
available for the device. ``GSPN_BACKEND=<name>`` in the environment replaces ``"auto"``.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import torch

from .validation import BACKENDS

_MODULES = {"reference": "gspn.ops.reference", "cpu": "gspn.ops.cpu", "triton": "gspn.ops.triton"}
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("triton", "reference")}
_warned: set[str] = set()


def _module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError:
        return None


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on ``device`` (the CPU backend is built on first call)."""
    device = torch.device(device)
    names = []
    for name in _MODULES:
        module = _module(name)
        if module is not None and module.is_available(device):
            names.append(name)
    return names


def resolve_backend(name: str, device: torch.device) -> ModuleType:
    """Return the backend module for ``name`` on ``device``; ``"auto"`` picks the fastest available."""
    if name == "auto":
        name = os.environ.get("GSPN_BACKEND") or "auto"  # unset or empty: auto
        if name not in BACKENDS:
            raise ValueError(f"the environment variable GSPN_BACKEND must be one of {BACKENDS}, got {name!r}")
    elif name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name != "auto":
        module = _module(name)
        if module is None or not module.is_available(device):
            reason = getattr(module, "unavailable_reason", lambda d: "it is not installed")(device)
            raise RuntimeError(f"backend {name!r} is not available for {device.type} tensors: {reason}")
        return module
    for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
        module = _module(candidate)
        if module is not None and module.is_available(device):
            return module
        if module is not None and candidate not in _warned and device.type == "cpu":
            _warned.add(candidate)
            warnings.warn(
                f"gspn: the {candidate!r} backend is unavailable ({module.unavailable_reason(device)}); "
                "falling back to the slow reference backend",
                RuntimeWarning,
                stacklevel=3,
            )
    raise AssertionError("the reference backend is always available")
