"""One builder for every registered model, as timm's ``build_model_with_cfg``.

Every ``@register_model`` entry point is ``name(pretrained=False, **kwargs)`` and ends in
:func:`build_model_with_cfg`, which owns what all families share: the ``pretrained=`` argument
(the authors' checkpoints and the reference semantics through
:func:`~gspn.models.reference_checkpoints.plan_pretrained`, our safetensors files through
:func:`~gspn.models.checkpoint.load_pretrained`), the ``default_cfg`` a model carries, the record of
its constructor arguments (``model_args``, what a weight file stores and ``reset_classifier`` keeps
in step, :func:`record_head_args`), and ``features_only`` / ``out_indices``
(:class:`~gspn.models.FeatureListNet`).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from ._features import FeatureListNet
from ._registry import get_default_cfg
from .checkpoint import load_pretrained
from .reference_checkpoints import PretrainedPlan, plan_pretrained

__all__ = ["build_model_with_cfg", "record_head_args"]


def build_model_with_cfg(
    model_cls: Callable[..., nn.Module],
    variant: str,
    pretrained: bool | str | os.PathLike | None = False,
    model_cfg: dict[str, Any] | None = None,
    *,
    default_cfg: dict[str, Any] | None = None,
    reference: str | None = None,
    features_only: bool = False,
    out_indices: int | Sequence[int] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build registered model ``variant``: ``model_cls(**model_cfg, **kwargs)``, its cfg, its weights.

    Args:
        model_cls: the model class (or any callable taking the constructor arguments).
        variant: the registered name (``default_cfg["architecture"]`` of the model).
        pretrained: ``False``/``None`` (random init), ``True`` (the published weights: the authors'
            checkpoint named by the cfg's ``hf_hub_id`` / ``hf_hub_filename``), or a path (a
            reference ``.pth`` of the ``reference`` family, or one of our ``.safetensors`` files).
        model_cfg: the variant's constructor arguments.
        default_cfg: the variant's configuration (default: the registered one,
            :func:`~gspn.models.get_default_cfg`); the model gets a copy, updated with the
            ``default_cfg`` its constructor set, ``architecture`` and ``num_classes``.
        reference: the family of the authors' checkpoints the model reads (``"classifier"``,
            ``"generator"``; :func:`~gspn.models.reference_checkpoints.plan_pretrained` then applies
            the reference semantics for their weights and takes ``pretrained_entry`` /
            ``semantics``), or ``None``: no reference checkpoints, only our files.
        features_only: wrap the model in a :class:`~gspn.models.FeatureListNet` (classifiers only;
            after the weights are loaded).
        out_indices: its feature levels (``None``: the model's ``default_out_indices``).
        **kwargs: the caller's constructor arguments; they win over ``model_cfg`` and over the
            options implied by ``pretrained``.

    Returns:
        the model with ``default_cfg`` and ``model_args`` (the arguments it was built with), or its
        :class:`~gspn.models.FeatureListNet`.

    Raises:
        ValueError: ``out_indices`` without ``features_only``; ``features_only`` for a model that
            is not a classifier; ``pretrained=True`` for a family without published weights (or
            the errors of ``plan_pretrained``); weights whose stored options ``model_cls`` does not
            take (another family's file); the constructor's errors.
    """
    if default_cfg is None:
        default_cfg = get_default_cfg(variant)
    if out_indices is not None and not features_only:
        raise ValueError("out_indices selects the feature maps of features_only=True; pass features_only=True")
    task = default_cfg.get("task", "classification")
    if features_only and task != "classification":
        raise ValueError(f"features_only needs a classifier backbone; {variant!r} is a {task} model")
    if reference is not None:
        plan = plan_pretrained(variant, reference, pretrained, kwargs, default_cfg)
    elif pretrained is True:
        raise ValueError(
            f"{variant!r} has no published weights; train one (gspn train --model {variant}) and pass "
            "pretrained='path/to/weights.safetensors'"
        )
    else:
        plan = PretrainedPlan({}, kwargs, lambda model: load_pretrained(model, pretrained))
    foreign = sorted(set(plan.model_args) - set(inspect.signature(model_cls).parameters))
    if foreign:
        raise ValueError(
            f"{pretrained} was written for another model family (options {foreign}); it cannot fit {variant}"
        )
    args = {**(model_cfg or {}), **plan.model_args, **plan.overrides}

    cfg = default_cfg

    def build() -> nn.Module:
        model = model_cls(**args)
        own = getattr(model, "default_cfg", None) or {}  # what the instance knows (e.g. its input size)
        model.default_cfg = {**cfg, **own, "architecture": variant, "num_classes": model.num_classes}
        model.model_args = args
        return model

    model = plan.create(build)
    return FeatureListNet(model, out_indices) if features_only else model


def record_head_args(model_args: dict[str, Any] | None, num_classes: int, global_pool: str | None) -> None:
    """Keep a model's construction arguments (what a weight file records) in step with
    ``reset_classifier(num_classes, global_pool)``: ``"avg"``, the constructors' default, is left
    out; ``None`` keeps the pooling. No-op for a model without recorded arguments."""
    if not model_args:
        return
    model_args["num_classes"] = num_classes
    if global_pool == "avg":
        model_args.pop("global_pool", None)
    elif global_pool == "":
        model_args["global_pool"] = ""
