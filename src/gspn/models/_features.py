"""timm-style feature extraction for dense prediction: ``create_model(name, features_only=True)``.

:class:`FeatureListNet` wraps a classifier that has ``feature_info`` (one ``{"num_chs",
"reduction", "module"}`` dict per feature level), ``forward_intermediates`` and
``prune_intermediate_layers``, and returns the list of the selected feature maps, each
``(B, C, H/r, W/r)``; its ``feature_info`` is a :class:`FeatureInfo` (``channels()``,
``reduction()``, ``module_name()``), what segmentation and detection libraries read to wire a
timm backbone in. It works like timm's ``FeatureGetterNet`` (the model is kept as ``.model`` and
pruned: the levels after the last selected one and the classifier head are removed, so every
remaining parameter gets a gradient) and returns what timm's ``FeatureListNet`` returns. No timm
dependency. :func:`feature_indices` is the one rule for the ``indices`` of every model's
``forward_intermediates``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["FeatureInfo", "FeatureListNet", "feature_indices", "resolve_out_indices"]

OutIndices = int | Sequence[int]


def feature_indices(indices: int | Sequence[int] | None, n: int, what: str = "block") -> list[int]:
    """The sorted indices selected by a timm-style ``indices`` argument of ``forward_intermediates``.

    Args:
        indices: ``None`` = all ``n``, an int ``k`` = the last ``k``, or a sequence of (possibly
            negative) indices.
        n: number of blocks (or stages).
        what: their name in error messages.

    Raises:
        IndexError: a count outside ``[0, n]`` or an index outside ``[-n, n)``.
    """
    if indices is None:
        return list(range(n))
    if isinstance(indices, int):
        if not 0 <= indices <= n:
            raise IndexError(f"cannot take the last {indices} of {n} {what}s")
        return list(range(n - indices, n))
    for i in indices:
        if not -n <= i < n:
            raise IndexError(f"{what} index {i} is out of range for {n} {what}s")
    return sorted({i % n for i in indices})


def resolve_out_indices(out_indices: OutIndices, n: int) -> tuple[int, ...]:
    """``out_indices`` as sorted non-negative feature indices of a model with ``n`` feature levels.

    As timm: an int ``k`` selects the last ``k`` levels; a sequence selects those indices (negative
    ones count from the end).

    Raises:
        ValueError: an int outside ``[1, n]``, an index outside ``[-n, n)``, a repeated level, an
            empty sequence, or not an int / sequence of ints (the message names ``out_indices`` and
            the valid range).
    """
    valid = f"valid: an int in [1, {n}] (the last k levels) or indices in [-{n}, {n})"
    if isinstance(out_indices, bool) or not isinstance(out_indices, (int, Sequence)) or isinstance(out_indices, str):
        raise ValueError(f"out_indices={out_indices!r} is not an int or a sequence of ints; {valid}")
    items = out_indices if isinstance(out_indices, int) else tuple(out_indices)
    if items == ():
        raise ValueError(f"out_indices is empty; {valid}")
    if items == 0:
        raise ValueError(f"out_indices=0 is out of range for {n} feature levels; {valid}")
    if not isinstance(items, int) and any(isinstance(i, bool) or not isinstance(i, int) for i in items):
        raise ValueError(f"out_indices={items!r} holds something that is not an int; {valid}")
    try:  # the rule of forward_intermediates' ``indices``, stricter: no empty selection, no repeats
        resolved = tuple(feature_indices(items, n, "feature level"))
    except IndexError as exc:
        raise ValueError(f"out_indices={items!r}: {exc}; {valid}") from None
    if not isinstance(items, int) and len(resolved) != len(items):
        raise ValueError(f"out_indices={items!r} names a feature level twice; {valid}")
    return resolved


class FeatureInfo:
    """timm's ``FeatureInfo``: the ``feature_info`` dicts of every level of a model plus the
    selected ``out_indices``.

    ``channels()``, ``reduction()`` and ``module_name()`` give the value of every selected level (in
    output order); with ``idx`` (an int or a list) they give those levels' values, ignoring the
    selection. ``info[i]`` / ``len(info)`` index all levels.
    """

    def __init__(self, feature_info: Sequence[dict[str, Any]], out_indices: OutIndices) -> None:
        info = [dict(copy.deepcopy(fi), index=fi.get("index", i)) for i, fi in enumerate(feature_info)]
        previous = 1
        for fi in info:
            if not (fi.get("num_chs", 0) > 0 and fi.get("reduction", 0) >= previous and "module" in fi):
                raise ValueError(f"bad feature_info entry {fi}: needs num_chs > 0, non-decreasing reduction, module")
            previous = fi["reduction"]
        self.info = info
        self.out_indices = resolve_out_indices(out_indices, len(info))

    def from_other(self, out_indices: OutIndices) -> FeatureInfo:
        """The same levels with another selection."""
        return FeatureInfo(self.info, out_indices)

    def get(self, key: str, idx: int | Sequence[int] | None = None) -> Any:
        """``key`` of every selected level (``idx=None``), of level ``idx``, or of each level in ``idx``."""
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def get_dicts(self, keys: Sequence[str] | None = None, idx: int | Sequence[int] | None = None) -> Any:
        """The info dicts (restricted to ``keys``) of the selected levels, or of ``idx``."""

        def pick(i: int) -> dict[str, Any]:
            return self.info[i] if keys is None else {k: self.info[i][k] for k in keys}

        if idx is None:
            return [pick(i) for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [pick(i) for i in idx]
        return pick(idx)

    def channels(self, idx: int | Sequence[int] | None = None) -> Any:
        """Channels ``C`` of the feature maps."""
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> Any:
        """Output stride of the feature maps (input side / map side)."""
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> Any:
        """Name of the module of the classifier whose output the feature is."""
        return self.get("module", idx)

    def __getitem__(self, item: int) -> dict[str, Any]:
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)

    def __repr__(self) -> str:
        return f"FeatureInfo(out_indices={self.out_indices}, channels={self.channels()}, reduction={self.reduction()})"


class FeatureListNet(nn.Module):
    """A classifier as a backbone for dense prediction: ``(B, in_chans, H, W) → [feature maps]``.

    Args:
        model: a classifier with ``feature_info``, ``forward_intermediates`` and
            ``prune_intermediate_layers`` (every ``gspn_*``, ``gspn_vit_*``, ``vit_*`` and baseline
            classifier). It is pruned in place: the levels after the last selected one and its head
            go (it can no longer classify).
        out_indices: the levels to return (:func:`resolve_out_indices`); ``None``: the model's
            ``default_out_indices`` — every stage of a hierarchical model, the last 3 blocks of an
            isotropic one (timm's defaults).

    Attributes:
        feature_info: a :class:`FeatureInfo` of the selected levels.
        out_indices: the selected levels, sorted, non-negative.
        model: the pruned classifier (state-dict keys ``model.*``).
        default_cfg / pretrained_cfg: the classifier's configuration (mean, std, input size, ...).

    Returns (``forward``): one ``(B, channels[i], ⌈H/reduction[i]⌉, ⌈W/reduction[i]⌉)`` map per
    selected level, in level order (for ``gspn_*``: ``⌈·⌉`` of each stride-2 step; for the isotropic
    models the token grid ``⌈H/p⌉ × ⌈W/p⌉``; the ViT baseline crops to ``⌊H/p⌋ × ⌊W/p⌋``).

    Raises:
        ValueError: invalid ``out_indices`` (the message gives the valid range), or a model without
            the feature protocol.
    """

    def __init__(self, model: nn.Module, out_indices: OutIndices | None = None) -> None:
        super().__init__()
        needed = ("feature_info", "forward_intermediates", "prune_intermediate_layers")
        missing = [a for a in needed if not hasattr(model, a)]
        if missing:
            raise ValueError(f"{type(model).__name__} does not support features_only (no {', '.join(missing)})")
        if out_indices is None:
            out_indices = model.default_out_indices
        indices = resolve_out_indices(out_indices, len(model.feature_info))
        model.prune_intermediate_layers(list(indices), prune_norm=True, prune_head=True)
        self.feature_info = FeatureInfo(model.feature_info, indices)
        self.out_indices = indices
        self.model = model
        self.default_cfg: dict[str, Any] = dict(getattr(model, "default_cfg", {}) or {})

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """Alias of :attr:`default_cfg` (timm's newer name)."""
        return self.default_cfg

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass to save memory (``ValueError`` if the
        model cannot)."""
        fn = getattr(self.model, "set_grad_checkpointing", None)
        if fn is None:
            raise ValueError(f"{type(self.model).__name__} has no gradient checkpointing")
        fn(enable)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, indices=list(self.out_indices), intermediates_only=True)
