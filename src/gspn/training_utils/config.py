"""The one config vocabulary of every recipe: :class:`RunConfig`, the device resolver, the precision names.

Every recipe's config is a dataclass deriving from :class:`RunConfig`. A field's name is the name of the
command-line flag that sets it (``output_dir`` ↔ ``--output-dir``, ``image_size`` ↔ ``--image-size``,
``in_channels`` ↔ ``--in-channels``, ``precision`` ↔ ``--precision``), so the command package maps flags
to fields by name alone and library messages name fields (:class:`ConfigError`) that the command line
shows as flags.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._validate import ConfigError

__all__ = [
    "PRECISIONS",
    "RUN_FIELDS",
    "ConfigError",
    "RunConfig",
    "autocast_dtype",
    "config_dict",
    "model_from_config",
    "resolve_device",
]

#: The precision names (one spelling each): ``auto`` (bf16 if the GPU supports it, else fp16 with a
#: gradient scaler; float32 off the GPU), ``fp32``, ``bf16``, ``fp16``.
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")


@dataclass
class RunConfig:
    """What every run shares: where it writes, how it continues, where it runs.

    Fields:
        output_dir: the run folder (checkpoints, metrics, exported weights, samples).
        resume: ``None`` (a fresh run), ``"auto"`` (continue from ``<output_dir>/last.pt`` if present)
            or the path of a training state to continue from.
        overwrite: replace the run already in ``output_dir`` instead of refusing to start.
        allow_changes: continue a run whose settings differ from this config (listed, then accepted).
        seed: the seed every random draw derives from.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        threads: torch CPU threads (``0``: torch's default).
        progress: show the progress bar.
        quiet: print nothing but errors (no header, log or closing lines).
    """

    output_dir: str = "runs/run"
    resume: str | None = None
    overwrite: bool = False
    allow_changes: bool = False
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    progress: bool = True
    quiet: bool = False


#: Fields that say how a run is carried out, not what it computes: never compared on resume.
RUN_FIELDS: frozenset[str] = frozenset(
    {"output_dir", "resume", "overwrite", "allow_changes", "device", "threads", "progress", "quiet", "plot"}
)


def config_dict(config: Any) -> dict[str, Any]:
    """``dataclasses.asdict(config)`` with tuples as lists (as it reads back from a training state)."""
    from .metrics import json_safe

    return json_safe(dataclasses.asdict(config))


def resolve_device(name: str) -> torch.device:
    """The :class:`torch.device` of a ``device`` setting (the one resolver of ``"auto"``).

    ``"auto"`` is CUDA when available, else CPU. Under ``torchrun`` the caller picks the local rank's
    GPU for an index-less ``"cuda"`` (:func:`~gspn.training_utils.init_distributed`).

    Raises:
        ConfigError: ``name`` is not a device torch knows, or names CUDA on a machine without it.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError("device", f"{name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", f"{name} names CUDA, which this machine does not have; use cpu or auto")
    return dev


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a ``precision`` setting on ``device``; ``None`` for float32.

    ``auto`` is bf16 on a GPU that supports it, else fp16 (with a gradient scaler), and float32 off the GPU;
    ``bf16`` autocasts on the CPU too (CPU autocast supports it); ``fp16`` off the GPU warns and trains in
    float32.

    Raises:
        ConfigError: ``precision`` is not one of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ConfigError("precision", f"must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "bf16" and device.type == "cpu":
        return torch.bfloat16
    if precision == "fp32" or device.type != "cuda":
        if precision == "fp16":
            warnings.warn("fp16 mixed precision is only used on CUDA; running in float32", stacklevel=3)
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def model_from_config(
    factory: Callable[..., nn.Module], model: str, model_args: dict[str, Any], **fixed: Any
) -> nn.Module:
    """``factory(model, **fixed, **model_args)``: the model a run builds from its ``model`` and
    ``model_args`` fields, with ``fixed`` the arguments the run sets itself (from the data or other fields).

    Raises:
        ConfigError: naming ``model_args``, when it sets one of ``fixed`` or the constructor rejects it
            (an unknown, ill-typed or impossible override: the constructor's ``TypeError``,
            ``ValueError`` or ``RuntimeError``).
    """
    clash = sorted(set(fixed) & set(model_args))
    if clash:
        names = ", ".join(clash)
        raise ConfigError("model_args", f"cannot set {names}: the run sets it from the data or its own fields")
    try:
        return factory(model, **fixed, **model_args)
    except (TypeError, ValueError, RuntimeError) as exc:
        if not model_args:
            raise
        raise ConfigError("model_args", f"{model_args} for {model}: {exc}") from exc
