"""The one training-state format (``last.pt``) of every recipe, atomic checkpoint files and RNG capture.

A training state is a plain dict of tensors and Python primitives, so it loads with
``torch.load(..., weights_only=True)``. Every recipe builds it with :func:`training_state`, so the same
thing has the same key in all of them:

==============  ==========================================================================================
``format``      :data:`STATE_FORMAT`
``model``       the trained module's ``state_dict()`` (distillation: the adapter's, or the UNet's)
``optimizer``   ``optimizer.state_dict()``
``scheduler``   the LR scheduler's ``state_dict()`` (``None`` if the recipe has none)
``scaler``      the ``torch.amp.GradScaler``'s ``state_dict()`` (``None`` if the recipe has none)
``ema``         the EMA's ``state_dict()`` (``None`` without EMA)
``epoch``       the last finished epoch (``None`` for step-based recipes)
``step``        optimizer steps done
``rng``         a list with one :func:`capture_rng` per process, indexed by rank
``config``      the recipe's config as a dict
==============  ==========================================================================================

plus recipe-specific entries (``model_name``, ``model_args``, ...). :func:`load_state` reads files
written before the key names were unified (``opt``, ``lr_scheduler``, ``trainable``, ``args``, ``arch``)
as if they had been written now, and :func:`restore_rank_rng` their single RNG dict.

Files are written to a temporary file in the same directory, flushed and fsync'ed, then moved into
place with :func:`os.replace`, which is atomic on POSIX and Windows: a crash leaves either the previous
file or the new one, never a truncated one.
"""

from __future__ import annotations

import os
import random
import warnings
from typing import Any

import numpy as np
import torch

from .._files import atomic_torch_save, atomic_write, safe_torch_load

__all__ = [
    "STATE_FORMAT",
    "STATE_KEYS",
    "atomic_write",
    "capture_rng",
    "load_state",
    "restore_rank_rng",
    "restore_rng",
    "save_state",
    "training_state",
    "upgrade_state",
]

#: Value of the ``format`` entry of a training state (the classification recipe's since its first release).
STATE_FORMAT = "gspn-train-v1"

#: The entries every training state has (see the module docstring).
STATE_KEYS: tuple[str, ...] = (
    "format",
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "ema",
    "epoch",
    "step",
    "rng",
    "config",
)

#: Key names of the DiT (``opt``, ``args``, ``arch``) and distillation (``trainable``, ``lr_scheduler``)
#: states written before the format was shared → today's names.
_LEGACY_KEYS = {
    "opt": "optimizer",
    "lr_scheduler": "scheduler",
    "trainable": "model",
    "args": "config",
    "arch": "model_name",
}


def training_state(
    *,
    model: dict[str, Any],
    optimizer: dict[str, Any],
    step: int,
    rng: list[dict[str, Any]],
    config: dict[str, Any],
    scheduler: dict[str, Any] | None = None,
    scaler: dict[str, Any] | None = None,
    ema: dict[str, Any] | None = None,
    epoch: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A training state with the shared key names (:data:`STATE_KEYS`) plus the recipe's ``extra`` entries.

    ``rng`` is the list of every process's :func:`capture_rng`, indexed by rank (``[capture_rng()]`` for
    one process). Raises ``TypeError`` when ``rng`` is not a list and ``ValueError`` when an ``extra``
    key is one of :data:`STATE_KEYS` or a legacy name.
    """
    if not isinstance(rng, list):
        raise TypeError(f"rng must be a list of per-rank capture_rng() states, got {type(rng).__name__}")
    clash = sorted(set(extra) & (set(STATE_KEYS) | set(_LEGACY_KEYS)))
    if clash:
        raise ValueError(f"extra entries {clash} would shadow the shared training-state keys")
    return {
        "format": STATE_FORMAT,
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "scaler": scaler,
        "ema": ema,
        "epoch": epoch,
        "step": int(step),
        "rng": rng,
        "config": config,
        **extra,
    }


#: Config field names (and values) of states written before the recipes shared one vocabulary → today's.
_LEGACY_CONFIG_KEYS = {
    "output": "output_dir",
    "img_size": "image_size",
    "resolution": "image_size",
    "in_chans": "in_channels",
    "amp": "precision",
    "mixed_precision": "precision",
    "max_grad_norm": "clip_grad",
}
_LEGACY_PRECISION = {"off": "fp32", "no": "fp32", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _upgrade_config(config: dict[str, Any]) -> dict[str, Any]:
    for old, new in _LEGACY_CONFIG_KEYS.items():
        if old in config and new not in config:
            config[new] = config.pop(old)
    if "precision" in config:
        config["precision"] = _LEGACY_PRECISION.get(config["precision"], config["precision"])
    if "verbose" in config and "quiet" not in config:
        config["quiet"] = not config.pop("verbose")
    return config


def upgrade_state(state: dict[str, Any]) -> dict[str, Any]:
    """Rename the legacy keys of ``state`` in place (``opt`` → ``optimizer``, ``lr_scheduler`` →
    ``scheduler``, ``trainable`` → ``model``, ``args`` → ``config``, ``arch`` → ``model_name``) and the
    config's legacy field names (``output``, ``img_size``, ``in_chans``, ``amp``, ...), and return it.
    A key already present under its new name wins. States written by :func:`training_state` are
    returned unchanged."""
    legacy = False
    for old, new in _LEGACY_KEYS.items():
        if old in state and new not in state:
            state[new] = state.pop(old)
            legacy = True
    if legacy:  # the DiT and distillation states written before the shared format had no ``format``
        state.setdefault("format", STATE_FORMAT)
    if isinstance(state.get("config"), dict):
        _upgrade_config(state["config"])
    return state


def save_state(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Atomically ``torch.save`` a training state (``last.pt``: weights, optimizer, RNG, ...) to ``path``.

    Weights for use elsewhere are written by :func:`gspn.models.save_checkpoint` (safetensors)."""
    atomic_torch_save(state, path)


def load_state(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a training state written by :func:`save_state` (tensors and primitives only; never runs code).

    A dict with legacy key names is upgraded (:func:`upgrade_state`); raises
    :class:`gspn._pickle.UnsafeCheckpointError` for a pickle that would run code."""
    state = safe_torch_load(path, map_location=map_location)
    return upgrade_state(state) if isinstance(state, dict) else state


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
    np.random.set_state((n["key"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if loader_generator is not None and state.get("loader") is not None:
        loader_generator.set_state(state["loader"].cpu())


def restore_rank_rng(
    rng: list[dict[str, Any]] | dict[str, Any],
    rank: int,
    world_size: int,
    loader_generator: torch.Generator | None = None,
    *,
    warn: bool = True,
) -> bool:
    """Restore this process's entry of a training state's ``rng`` list (:func:`restore_rng`).

    A single :func:`capture_rng` dict (the DiT and distillation states written before the format was
    shared held rank 0's only) is restored on every rank. Returns ``False``, restoring nothing, when the
    list was written by another number of processes; the continuation then is not bit-exact, which a
    ``UserWarning`` says unless ``warn=False`` (a recipe whose every draw is seeded per step)."""
    if isinstance(rng, dict):
        restore_rng(rng, loader_generator)
        return True
    if len(rng) != world_size:
        if warn:
            warnings.warn(
                f"resume: the state was written by {len(rng)} processes, this run has {world_size}; "
                "RNG streams are re-seeded, so the continuation is not bit-exact",
                stacklevel=3,
            )
        return False
    restore_rng(rng[rank], loader_generator)
    return True
