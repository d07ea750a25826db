"""``gspn convert``'s library function: one of the authors' checkpoints as one of our safetensors files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ._registry import create_model
from .checkpoint import save_checkpoint
from .reference_checkpoints import infer_reference_model

__all__ = ["convert_checkpoint"]


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    model: str | None = None,
    *,
    entry: str | None = None,
    **overrides: Any,
) -> Path:
    """Convert a reference checkpoint into one of our safetensors files (``gspn convert``).

    The model is built with the reference semantics (under ``overrides``), loaded, and written by
    :func:`gspn.models.save_checkpoint` with its architecture and constructor arguments — so
    :func:`gspn.models.load_model` (or ``create_model(model, pretrained=dst)``) later rebuilds
    the same model without any pickle. The source is recorded as metadata ``gspn.source``.

    Args:
        src: reference ``.pth``.
        dst: output ``.safetensors``.
        model: registered model name; inferred from the tensor shapes when ``None``.
        entry: which state dict (default :data:`~gspn.models.reference_checkpoints.DEFAULT_ENTRY` of the kind).
        **overrides: constructor arguments for a reference configuration other than the
            registered one (e.g. ``embed_dim``, ``depths``).

    Returns:
        the path written.

    Raises:
        the errors of :func:`~gspn.models.reference_checkpoints.load_reference_checkpoint` and
        :func:`~gspn.models.reference_checkpoints.infer_reference_model`.
    """
    if model is None:
        _, model = infer_reference_model(src)
    net = create_model(model, pretrained=os.fspath(src), pretrained_entry=entry, **overrides)
    cfg = getattr(net, "default_cfg", {})
    source = {k: cfg[k] for k in ("file", "checkpoint_entry", "checkpoint_format", "semantics") if k in cfg}
    return save_checkpoint(net, dst, metadata={"gspn.source": json.dumps(source)})
