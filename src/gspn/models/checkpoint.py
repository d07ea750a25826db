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

__all__ = [
    "classifier_prefixes",
    "drop_mismatched_classifier",
    "load_checkpoint",
    "load_model",
    "load_pretrained",
    "load_weights",
    "read_metadata",
    "save_checkpoint",
]

_ARCH_KEY = "gspn.architecture"
_ARGS_KEY = "gspn.model_args"


def save_checkpoint(model: nn.Module, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> Path:
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


def classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Module names of ``model``'s classifier, from ``model.default_cfg["classifier"]`` (a name or
    a tuple of names, timm's convention); ``()`` when the model declares none."""
    head = getattr(model, "default_cfg", {}).get("classifier") or ()
    return (head,) if isinstance(head, str) else tuple(head)


def _describe_head(shapes: dict[str, tuple[int, ...]], prefix: str) -> str:
    weight = shapes.get(f"{prefix}weight")
    if not shapes:
        return "headless"
    if weight:
        return f"{weight[0]} classes"
    return ", ".join(f"{k} {list(v)}" for k, v in shapes.items())


def drop_mismatched_classifier(
    model: nn.Module, state: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Drop a checkpoint classifier that does not fit ``model``'s classifier (timm's rule).

    For each classifier named by :func:`classifier_prefixes`, the tensors of ``state`` under it are
    compared with the model's: when the key sets differ (the model is headless and the checkpoint
    is not, or the reverse) or a shape differs (another number of classes), the checkpoint's
    classifier tensors are removed and a ``UserWarning`` says so; the model keeps its freshly
    initialised classifier (or none). Nothing outside the classifiers is touched.

    Args:
        model: the model to load into.
        state: a state dict (name → tensor); not modified.

    Returns:
        ``(state, kept)``: the filtered copy of ``state``, and the model's state-dict keys that keep
        their current values (to be excluded from the missing-key check of a strict load).
    """
    state = dict(state)
    own = model.state_dict()
    kept: list[str] = []
    for head in classifier_prefixes(model):
        prefix = f"{head}."
        theirs = {k: tuple(v.shape) for k, v in state.items() if k.startswith(prefix)}
        mine = {k: tuple(v.shape) for k, v in own.items() if k.startswith(prefix)}
        if theirs == mine:
            continue
        for k in theirs:
            del state[k]
        kept.extend(mine)
        warnings.warn(
            f"classifier {head!r} of the checkpoint ({_describe_head(theirs, prefix)}) does not match "
            f"the model's ({_describe_head(mine, prefix)}): not loading {sorted(theirs)}; the model keeps "
            f"{'its freshly initialised classifier' if mine else 'no classifier (features only)'}",
            stacklevel=2,
        )
    return state, kept


def load_weights(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    strict: bool = True,
    skip_mismatched_head: bool = True,
) -> Any:
    """Load the state dict ``state`` into ``model``, tolerating only a classifier mismatch.

    With ``skip_mismatched_head`` (default) a checkpoint classifier that does not fit the model's —
    another number of classes, a headless model, a headless checkpoint — is dropped with a warning
    and the model keeps its own (:func:`drop_mismatched_classifier`). With ``strict`` every other key
    must match: missing or unexpected keys raise ``RuntimeError`` naming them, before anything is
    loaded; shape mismatches raise ``torch.nn.Module.load_state_dict``'s ``RuntimeError``.

    A model whose weight layout changed may define ``upgrade_state_dict(state) -> state``, which maps
    keys of older files to the current ones; it runs first (e.g. ``baseline_vit``'s older key names).

    Returns ``torch.nn.Module.load_state_dict``'s result (the model's kept classifier keys appear
    among its ``missing_keys``).
    """
    upgrade = getattr(model, "upgrade_state_dict", None)
    if callable(upgrade):
        state = upgrade(dict(state))
    kept: list[str] = []
    if skip_mismatched_head:
        state, kept = drop_mismatched_classifier(model, state)
    if strict:
        own = model.state_dict()
        missing = sorted(set(own) - set(state) - set(kept))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            problems = [f"missing key(s) {missing}"] if missing else []
            problems += [f"unexpected key(s) {unexpected}"] if unexpected else []
            raise RuntimeError(f"error loading state dict into {type(model).__name__}: {'; '.join(problems)}")
    return model.load_state_dict(state, strict=False)


def load_checkpoint(
    model: nn.Module, path: str | os.PathLike, *, strict: bool = True, skip_mismatched_head: bool = True
) -> Any:
    """Load a safetensors state dict into ``model`` (on the model's device).

    A checkpoint classifier (``model.default_cfg["classifier"]``) that differs from the model's —
    another number of classes, a headless model (``num_classes=0``), or a checkpoint without one —
    is not loaded: a ``UserWarning`` says so and the model keeps its freshly initialised classifier
    (or none). Everything else loads strictly: missing or unexpected keys raise ``RuntimeError``
    naming them. ``skip_mismatched_head=False`` makes a classifier mismatch an error too.
    Returns ``torch.nn.Module.load_state_dict``'s result; see :func:`load_weights`.
    """
    device = next((t.device for t in model.state_dict().values()), torch.device("cpu"))
    state = load_file(str(path), device=str(device))
    return load_weights(model, state, strict=strict, skip_mismatched_head=skip_mismatched_head)


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
        raise ValueError(f"{os.fspath(path)!r} has no {_ARCH_KEY!r} metadata; build the model and use load_checkpoint")
    args = json.loads(meta.get(_ARGS_KEY, "{}"))
    return create_model(meta[_ARCH_KEY], pretrained=os.fspath(path), **{**args, **overrides})
