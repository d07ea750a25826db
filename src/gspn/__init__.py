"""gspn: Generalized Spatial Propagation Networks for PyTorch.

The core is one operator, :func:`gspn.ops.line_scan`: a 2-D linear recurrence that processes an
image one line at a time, each pixel mixing three neighbours of the previous line.
:mod:`gspn.nn` builds the GSPN layers on it and :mod:`gspn.models` the backbones
(``gspn.create_model("gspn_t")``, ``gspn.list_models()``); both are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import ops

__version__ = "0.1.0"

_LAZY_MODULES = ("nn", "models")
_LAZY_ATTRS = {"create_model": "models", "list_models": "models"}

__all__ = ["__version__", "create_model", "list_models", "models", "nn", "ops"]


def __getattr__(name: str) -> Any:
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_ATTRS:
        return getattr(importlib.import_module(f".{_LAZY_ATTRS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
