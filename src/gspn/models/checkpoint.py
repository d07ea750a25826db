"""safetensors checkpoints that remember their architecture.

:func:`save_checkpoint` writes the model's state dict plus, as safetensors metadata, the registry
name and constructor arguments of the model, so :func:`load_model` can rebuild it from the file
alone. Writes are atomic (a temporary file is renamed over the target).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .._files import atomic_write

__all__ = ["load_checkpoint", "load_model", "load_pretrained", "read_metadata", "save_checkpoint"]

_ARCH_KEY = "gspn.architecture"
_ARGS_KEY = "gspn.model_args"


def save_checkpoint(
    model: nn.Module, path: str | os.PathLike, *, metadata: dict[str, str] | None = None
) -> Path:
    """Save ``model``'s parameters and buffers to ``path`` (safetensors), atomically.

    The registry architecture (``model.default_cfg["architecture"]``) and constructor arguments
    (``model.model_args``) are stored as metadata when the model has them. ``metadata`` adds
    string key/value pairs. Returns the path written.
    """
    path = Path(path)
    meta = {"format": "pt", **(metadata or {})}
    arch = getattr(model, "default_cfg", {}).get("architecture")
    if arch:
        meta[_ARCH_KEY] = arch
        try:
            meta[_ARGS_KEY] = json.dumps(getattr(model, "model_args", {}))
        except TypeError:
            warnings.warn("model_args are not JSON-serialisable; saving the architecture only", stacklevel=2)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return atomic_write(path, lambda f: f.write(safetensors_bytes(tensors, metadata=meta)))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata stored in a safetensors file."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_checkpoint(
    model: nn.Module, path: str | os.PathLike, *, strict: bool = True, skip_mismatched_head: bool = False
) -> Any:
    """Load a safetensors state dict into ``model`` (on the model's device).

    With ``skip_mismatched_head=True`` the classifier tensors (``model.default_cfg["classifier"]``)
    whose shapes differ from the model's are dropped with a warning, e.g. to fine-tune on a new
    number of classes. Returns ``torch.nn.Module.load_state_dict``'s result.
    """
    device = next((t.device for t in model.state_dict().values()), torch.device("cpu"))
    state = load_file(str(path), device=str(device))
    if skip_mismatched_head:
        own = model.state_dict()
        head = getattr(model, "default_cfg", {}).get("classifier", "")
        dropped = [
            k for k, v in state.items() if k.startswith(f"{head}.") and k in own and v.shape != own[k].shape
        ]
        if dropped:
            warnings.warn(f"not loading {dropped}: shape differs from the model's classifier", stacklevel=2)
            for k in dropped:
                del state[k]
            strict = False
    return model.load_state_dict(state, strict=strict)


def load_pretrained(model: nn.Module, pretrained: bool | str | os.PathLike) -> None:
    """Apply the ``pretrained`` argument of :func:`gspn.create_model` to a freshly built ``model``."""
    if pretrained is False or pretrained is None:
        return
    arch = getattr(model, "default_cfg", {}).get("architecture", type(model).__name__)
    if pretrained is True:
        raise RuntimeError(
            f"no pretrained weights are published for {arch!r} (the GSPN authors have not released "
            "checkpoints); pass pretrained='path/to/weights.safetensors' to load your own"
        )
    path = Path(pretrained)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained checkpoint {str(path)!r} does not exist")
    load_checkpoint(model, path, skip_mismatched_head=True)


def load_model(path: str | os.PathLike, **overrides: Any) -> nn.Module:
    """Rebuild a registered model from a checkpoint written by :func:`save_checkpoint` and load it.

    ``overrides`` replace stored constructor arguments (e.g. ``num_classes=10`` to re-head it).
    """
    from ._registry import create_model

    meta = read_metadata(path)
    if _ARCH_KEY not in meta:
        raise ValueError(
            f"{os.fspath(path)!r} has no {_ARCH_KEY!r} metadata; build the model and use load_checkpoint"
        )
    args = json.loads(meta.get(_ARGS_KEY, "{}"))
    return create_model(meta[_ARCH_KEY], pretrained=os.fspath(path), **{**args, **overrides})
