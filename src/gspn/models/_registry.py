"""A small timm-style model registry: ``@register_model``, :func:`create_model`, :func:`list_models`.

timm cannot be imported on machines without torchvision, so the registry is our own. An
entrypoint is a function ``name(pretrained=False, **kwargs) -> nn.Module`` that ends in
:func:`gspn.models._builder.build_model_with_cfg`; its default configuration (input size,
mean/std, number of classes, ...) lives in the ``default_cfgs`` dict of the module that defines
it, under the same name.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from torch import nn

__all__ = ["create_model", "get_default_cfg", "is_model", "list_models", "model_entrypoint", "register_model"]

_ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {}
F = TypeVar("F", bound=Callable[..., nn.Module])


def register_model(fn: F) -> F:
    """Decorator: register ``fn`` under its ``__name__`` (must be unique)."""
    name = fn.__name__
    if name in _ENTRYPOINTS and _ENTRYPOINTS[name] is not fn:
        raise ValueError(f"a model named {name!r} is already registered by {_ENTRYPOINTS[name].__module__}")
    _ENTRYPOINTS[name] = fn
    return fn


def list_models(pattern: str = "*", task: str | None = None) -> list[str]:
    """Sorted names of the registered models matching the shell-style ``pattern`` (e.g. ``"gspn_*"``).

    ``task`` keeps only the models of that task tag (``"classification"`` or ``"diffusion"``; a model's
    ``default_cfg["task"]``, classification when absent).
    """
    names = sorted(n for n in _ENTRYPOINTS if fnmatch.fnmatchcase(n, pattern))
    if task is not None:
        names = [n for n in names if get_default_cfg(n).get("task", "classification") == task]
    return names


def is_model(name: str) -> bool:
    """Whether ``name`` is a registered model."""
    return name in _ENTRYPOINTS


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The registered entrypoint of ``name``; a ``ValueError`` lists close matches when unknown."""
    try:
        return _ENTRYPOINTS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_ENTRYPOINTS), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (available: {', '.join(list_models())})") from None


def get_default_cfg(name: str) -> dict[str, Any]:
    """A copy of the default configuration of model ``name`` (input size, mean/std, num_classes, ...)."""
    fn = model_entrypoint(name)
    cfgs = getattr(sys.modules[fn.__module__], "default_cfgs", {})
    return dict(cfgs.get(name, {}))


def create_model(
    name: str,
    pretrained: bool | str | os.PathLike = False,
    *,
    features_only: bool = False,
    out_indices: int | Sequence[int] | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a registered model.

    Args:
        name: a name from :func:`list_models`, e.g. ``"gspn_t"``.
        pretrained: ``False`` (random init); ``True``: the authors' checkpoint from the Hugging
            Face Hub (GSPN-T/S/B; needs ``huggingface_hub``, honours its cache and
            ``HF_HUB_OFFLINE``); a path to a reference checkpoint (``.pth`` of the authors' code,
            classifier or GSPN-DiT, read without running its pickle) or to one of our
            ``.safetensors`` files. A classifier whose shape does not fit ``num_classes`` is
            skipped with a warning; anything else that does not fit raises ``ValueError``.
            Reference checkpoints build the model with the reference semantics
            (:func:`gspn.models.reference_checkpoints.reference_model_args`).
        **overrides: constructor arguments that replace the model's configuration
            (``num_classes``, ``drop_path_rate``, ``in_chans``, ...). Two are consumed here:
            ``pretrained_entry`` picks the state dict of a reference training checkpoint
            (classifier: ``"model"`` (default) or ``"model_ema"``; generator: ``"ema"`` (default)
            or ``"model"``), and ``semantics="reference"`` / ``"aligned"`` forces either set of
            options (default: reference for reference weights, aligned otherwise).
            ``global_pool=""`` builds a classifier without pooling (timm's meaning: ``forward``
            returns the final map, or the token sequence of an isotropic model).
        features_only: return a backbone for dense prediction instead of the classifier: a
            :class:`~gspn.models.FeatureListNet` whose ``forward`` gives the list of the selected
            feature maps and whose ``feature_info`` gives their ``channels()`` / ``reduction()`` /
            ``module_name()``, as timm's ``features_only=True`` (classifiers only; the weights of
            ``pretrained`` are loaded first, then the head is removed).
        out_indices: the feature levels of ``features_only``: an int ``k`` (the last ``k``) or
            indices (negative from the end). Default as timm: every stage of ``gspn_*`` (and of
            ``baseline_conv``), the last 3 blocks of the isotropic ``gspn_vit_*`` / ``vit_*`` /
            ``baseline_vit``.

    Raises:
        ValueError: an unknown name, ``out_indices`` without ``features_only`` or outside the valid
            range (the message gives it), ``features_only`` for a model that is not a classifier,
            and the constructors' errors.

    To count parameters without allocating memory, build on the meta device:
    ``with torch.device("meta"): model = create_model("gspn_b")``.
    """
    entrypoint = model_entrypoint(name)
    if features_only or out_indices is not None:  # the builder checks and applies them
        overrides = {**overrides, "features_only": features_only, "out_indices": out_indices}
    return entrypoint(pretrained=pretrained, **overrides)
