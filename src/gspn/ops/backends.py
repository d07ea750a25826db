"""Backend registry for the line scan, and the contract every backend fulfils (:class:`ScanBackend`).

A backend is a module, ``gspn.ops.<name>`` for each name of
:data:`~gspn.ops.validation.BACKENDS` other than ``"auto"`` (``reference``, ``cpu``, ``triton``),
that satisfies :class:`ScanBackend`. It receives tensors already validated, with H and W
contiguous; parameters keep their compact broadcast shapes; unless it sets ``NATIVE_DTYPES`` they
are in the accumulation dtype (float32/float64). ``"auto"`` picks the fastest backend available for
the device; ``GSPN_BACKEND=<name>`` in the environment replaces ``"auto"``.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from .validation import BACKENDS, check_backend

__all__ = ["ScanBackend", "available_backends", "plain_allocate", "resolve_backend"]

_NAMED = tuple(name for name in BACKENDS if name != "auto")
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("triton", "reference")}
_warned: set[str] = set()


@runtime_checkable
class ScanBackend(Protocol):
    """What :func:`gspn.ops.line_scan` and :func:`gspn.ops.line_scan_4d` call on a backend module.

    ``isinstance(module, ScanBackend)`` checks that every member exists (not their signatures;
    ``tests/test_ops_api.py`` checks those for the shipped backends).
    """

    __name__: str
    """Module name, e.g. ``"gspn.ops.cpu"``."""

    NATIVE_DTYPES: bool
    """True if the kernels read float16/bfloat16 inputs directly (the caller must not up-cast them);
    False if they expect everything in the float32/float64 accumulation dtype."""

    def is_available(self, device: torch.device) -> bool:
        """True if the backend can run on tensors of ``device``."""
        ...

    def unavailable_reason(self, device: torch.device) -> str:
        """``""`` if the backend can run on ``device``, else a one-line reason for the error message."""
        ...

    def allocate(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised buffer for outputs and gradients (:func:`plain_allocate` unless the backend
        wants something special, e.g. huge pages)."""
        ...

    def scan(
        self,
        x: torch.Tensor,
        lam: torch.Tensor,
        w_left: torch.Tensor,
        w_mid: torch.Tensor,
        w_right: torch.Tensor,
        *,
        direction: str,
        chunk_size: int | None,
        normalize: bool,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """Forward scan of one direction: writes ``h`` (``(B, C, H, W)``, image frame) into ``out``
        (possibly a strided view, e.g. ``out[:, k]`` of a ``(B, 4, C, H, W)`` buffer) and returns it.
        ``x`` is ``(B, C, H, W)``; the parameters ``(B or 1, C or a divisor of C, H, W)``."""
        ...

    def scan_backward(
        self,
        grad: torch.Tensor,
        h: torch.Tensor,
        x: torch.Tensor,
        lam: torch.Tensor,
        w_left: torch.Tensor,
        w_mid: torch.Tensor,
        w_right: torch.Tensor,
        *,
        direction: str,
        chunk_size: int | None,
        normalize: bool,
        dx: torch.Tensor,
        accumulate_dx: bool,
        d_params: Sequence[torch.Tensor],
    ) -> None:
        """Adjoint scan of one direction: writes (or, with ``accumulate_dx``, adds) ``dL/dx`` into
        ``dx`` and the full-size ``(B, C, H, W)`` gradients of ``lam, w_left, w_mid, w_right``
        (w.r.t. the logits if ``normalize``) into the four ``d_params`` buffers (possibly strided
        views); reducing them to the broadcast shapes is the caller's job."""
        ...


def plain_allocate(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``: :meth:`ScanBackend.allocate` of the backends
    that need nothing special from their buffers (reference, triton)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _import(name: str) -> tuple[ScanBackend | None, str]:
    """The module of backend ``name``, or ``None`` and why it could not be imported."""
    try:
        return importlib.import_module(f"{__package__}.{name}"), ""  # type: ignore[return-value]
    except ImportError as exc:
        return None, f"importing {__package__}.{name} failed ({exc})"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on ``device`` (the CPU backend is built on first call)."""
    device = torch.device(device)
    names = []
    for name in _NAMED:
        module, _ = _import(name)
        if module is not None and module.is_available(device):
            names.append(name)
    return names


def resolve_backend(name: str, device: torch.device) -> ScanBackend:
    """The backend module for ``name`` on ``device``; ``"auto"`` (or ``GSPN_BACKEND``) picks the fastest
    available one, warning once per backend when a CPU backend falls back to ``"reference"``.

    Raises:
        ValueError: ``name`` (or a non-empty ``GSPN_BACKEND`` when ``name`` is ``"auto"``) is not one
            of :data:`~gspn.ops.validation.BACKENDS`.
        RuntimeError: a named backend that cannot run on ``device`` (the message says why).
    """
    if name == "auto":
        name = os.environ.get("GSPN_BACKEND") or "auto"  # unset or empty: auto
        if name not in BACKENDS:
            raise ValueError(f"the environment variable GSPN_BACKEND must be one of {BACKENDS}, got {name!r}")
    else:
        check_backend(name)
    if name != "auto":
        module, reason = _import(name)
        if module is None or not module.is_available(device):
            reason = reason or module.unavailable_reason(device)
            raise RuntimeError(f"backend {name!r} is not available for {device.type} tensors: {reason}")
        return module
    for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
        module, _ = _import(candidate)
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
