"""The one backend registry of the operators, keyed by ``(op, backend name)``.

A backend of an operator is a registration: :func:`register_backend` ``(op, name, impl)``, where
``impl`` is whatever the operator calls (for ``"line_scan"`` a module satisfying
:class:`gspn.ops.line_scan.ScanBackend`; for ``"gspn_mix"`` one with ``forward``/``backward``, see
:mod:`gspn.ops.gspn_mix`). Each operator package registers its backends when it is imported
(``gspn/ops/<op>/__init__.py``); :func:`resolve_backend` is how every operator finds the one to
run, so a new backend or a new operator is a registration, not an ``if name == ...`` branch.

``backend="auto"`` picks, in registration order, the first available backend registered as
preferred for the tensors' device type (``auto_on``), else the ``"reference"`` backend;
``GSPN_BACKEND=<name>`` in the environment replaces ``"auto"``. This module is the bottom of the
package: it imports nothing from it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "Backend",
    "available_backends",
    "backend_names",
    "check_backend",
    "plain_allocate",
    "register_backend",
    "resolve_backend",
]

REFERENCE = "reference"
"""The backend every operator has, on every device: the fallback of ``"auto"``."""


@dataclass(frozen=True)
class Backend:
    """One registration: backend ``name`` of operator ``op``."""

    op: str
    name: str
    impl: Any
    """What the operator calls (its contract is the operator's)."""
    is_available: Callable[[torch.device], bool]
    unavailable_reason: Callable[[torch.device], str]
    """``""`` where available, else a one-line reason for the error message."""
    auto_on: tuple[str, ...]
    """Device types for which ``"auto"`` prefers this backend."""


_REGISTRY: dict[tuple[str, str], Backend] = {}
_warned: set[str] = set()


def register_backend(
    op: str,
    name: str,
    impl: Any,
    *,
    is_available: Callable[[torch.device], bool] | None = None,
    unavailable_reason: Callable[[torch.device], str] | None = None,
    auto_on: Sequence[str] = (),
) -> Backend:
    """Register ``impl`` as backend ``name`` of operator ``op`` (replacing an earlier registration).

    Args:
        is_available, unavailable_reason: default to ``impl``'s functions of those names.
        auto_on: device types (``"cpu"``, ``"cuda"``) for which ``backend="auto"`` prefers it.

    Raises:
        ValueError: ``name`` is ``"auto"`` or not an identifier.
    """
    if name == "auto" or not name.isidentifier():
        raise ValueError(f"a backend name must be an identifier other than 'auto', got {name!r}")
    backend = Backend(
        op,
        name,
        impl,
        is_available or impl.is_available,
        unavailable_reason or impl.unavailable_reason,
        tuple(auto_on),
    )
    _REGISTRY[op, name] = backend
    return backend


def backend_names() -> tuple[str, ...]:
    """The values of ``backend=``: ``"auto"``, then every registered name in registration order."""
    names = ["auto"]
    for _, name in _REGISTRY:
        if name not in names:
            names.append(name)
    return tuple(names)


def check_backend(backend: object) -> None:
    """``backend`` must be one of :func:`backend_names` (``ValueError`` listing them otherwise)."""
    names = backend_names()
    if backend not in names:
        raise ValueError(f"backend must be one of {names}, got {backend!r}")


def plain_allocate(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``: the buffer allocator of the backends that
    need nothing special from their buffers (reference, triton)."""
    return torch.empty(shape, dtype=dtype, device=device)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on ``device``, every operator of theirs (the CPU backend is
    built on first call)."""
    device = torch.device(device)
    names = []
    for name in backend_names()[1:]:
        if all(b.is_available(device) for (_, n), b in _REGISTRY.items() if n == name):
            names.append(name)
    return names


def resolve_backend(name: str, device: torch.device, op: str = "line_scan") -> Any:
    """The implementation of backend ``name`` of ``op`` on ``device``; ``"auto"`` (or ``GSPN_BACKEND``)
    picks the fastest available one, warning once per backend when a CPU backend falls back to
    ``"reference"``.

    Raises:
        ValueError: ``name`` (or a non-empty ``GSPN_BACKEND`` when ``name`` is ``"auto"``) is not one
            of :func:`backend_names`.
        RuntimeError: a named backend that cannot run ``op`` on ``device`` (the message says why).
    """
    if name == "auto":
        name = os.environ.get("GSPN_BACKEND") or "auto"  # unset or empty: auto
        if name not in backend_names():
            raise ValueError(f"the environment variable GSPN_BACKEND must be one of {backend_names()}, got {name!r}")
    else:
        check_backend(name)
    if name != "auto":
        backend = _REGISTRY.get((op, name))
        reason = f"it has no {op!r} operator" if backend is None else backend.unavailable_reason(device)
        if reason:
            raise RuntimeError(f"backend {name!r} is not available for {device.type} tensors: {reason}")
        return backend.impl
    preferred = [b for (o, _), b in _REGISTRY.items() if o == op and device.type in b.auto_on]
    for backend in [*preferred, _REGISTRY[op, REFERENCE]]:
        if backend.is_available(device):
            return backend.impl
        if backend.name not in _warned and device.type == "cpu":
            _warned.add(backend.name)
            warnings.warn(
                f"gspn: the {backend.name!r} backend is unavailable ({backend.unavailable_reason(device)}); "
                "falling back to the slow reference backend",
                RuntimeWarning,
                stacklevel=3,
            )
    raise AssertionError("the reference backend is always available")
