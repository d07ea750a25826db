"""Argument checking and the broadcasting rules of the line-scan operators.

Supported broadcasts of a parameter (``lam``, ``w_left``, ``w_mid``, ``w_right``) against
``x: (B, C, H, W)``:

* batch: size ``B`` or 1 (shared by the whole batch);
* channels: size ``C``, or any divisor ``Cg`` of ``C``: parameter channel ``k`` is shared by the
  contiguous channel group ``[k*G, (k+1)*G)`` of ``x``, ``G = C // Cg`` (so ``Cg = 1`` shares one
  gate over all channels). This equals ``param.repeat_interleave(G, dim=1)``, GSPN-2's compact
  channel propagation;
* H and W: exactly ``H`` and ``W`` (no broadcast);
* :func:`~gspn.ops.line_scan_4d` only: the direction axis has size 4 or 1.

The four parameters may each use a different one of these layouts.
"""

from __future__ import annotations

import torch

from .backends import check_backend
from .directions import get_direction

PARAM_NAMES = ("lam", "w_left", "w_mid", "w_right")


MAX_CHUNK_SIZE = 2**63 - 1
"""Largest ``chunk_size`` handed to the operators (their schema and the kernels use int64)."""


def check_float_tensor(name: str, t: object) -> torch.Tensor:
    """``t`` itself if it is a real floating-point tensor, else a ``TypeError`` naming ``name``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(
            f"{name} must be a real floating-point tensor (float16, bfloat16, float32 or float64), got dtype {t.dtype}"
        )
    return t


def check_tensor(name: str, t: object, ndim: int, layout: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims {layout}, got shape {tuple(t.shape)}")
    return check_float_tensor(name, t)


def check_chunk_size(chunk_size: object) -> int | None:
    """``None`` or a positive int that fits the operators' int64 (``1 <= chunk_size < 2**63``);
    anything else raises a ``TypeError``/``ValueError`` naming ``chunk_size`` and the allowed values.
    (A chunk at least as long as the scan axis is one tile: use ``None`` for global GSPN.)"""
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be None or a positive int, got {type(chunk_size).__name__}")
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(
            f"chunk_size must be None (global) or an int in [1, 2**63 - 1] (the operators take int64), got {chunk_size}"
        )
    return chunk_size


def check_flags(normalize: object, backend: object) -> None:
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    check_backend(backend)


def check_line_scan_args(
    x: torch.Tensor,
    params: tuple[torch.Tensor, ...],
    *,
    direction: str | None,
    chunk_size: int | None,
    normalize: bool,
    backend: str,
    four_directions: bool,
) -> int | None:
    """Validate the arguments of ``line_scan`` / ``line_scan_4d``; returns the checked ``chunk_size``.

    Raises ``TypeError`` for wrong types/dtypes and ``ValueError`` for wrong shapes or values, each
    message naming the offending argument and what was expected.
    """
    check_tensor("x", x, 4, "(B, C, H, W)")
    batch, channels, height, width = x.shape
    if channels == 0:
        raise ValueError(
            f"x has C = 0 channels (shape {tuple(x.shape)}); C must be >= 1 (parameters broadcast over "
            "channel groups that divide C, which C = 0 leaves undefined)"
        )
    param_ndim = 5 if four_directions else 4
    layout = "(B, 4, C, H, W)" if four_directions else "(B, C, H, W)"
    for name, p in zip(PARAM_NAMES, params, strict=True):
        check_tensor(name, p, param_ndim, layout)
        if p.device != x.device:
            raise ValueError(f"{name} is on {p.device} but x is on {x.device}; all inputs must share a device")
        pb, *rest = p.shape
        if four_directions:
            pd, *rest = rest
        pc, ph, pw = rest
        ok = (
            pb in (batch, 1)
            and (not four_directions or pd in (4, 1))
            and pc >= 1
            and channels % pc == 0
            and (ph, pw) == (height, width)
        )
        if not ok:
            expected = (
                f"(B or 1, 4 or 1, C or a divisor of C, H, W) = ({batch}|1, 4|1, {channels}|divisor, {height}, {width})"
                if four_directions
                else f"(B or 1, C or a divisor of C, H, W) = ({batch}|1, {channels}|divisor, {height}, {width})"
            )
            raise ValueError(f"{name} has shape {tuple(p.shape)}, which does not broadcast to x: expected {expected}")
    if not four_directions:
        get_direction(direction)
    chunk_size = check_chunk_size(chunk_size)
    check_flags(normalize, backend)
    return chunk_size


def expand_channels(param: torch.Tensor, channels: int, channel_dim: int = 1) -> torch.Tensor:
    """Materialise a channel-shared parameter at full channel count (``repeat_interleave`` semantics)."""
    pc = param.shape[channel_dim]
    if pc == channels:
        return param
    return param.repeat_interleave(channels // pc, dim=channel_dim)


def reduce_to_shape(grad: torch.Tensor, shape: torch.Size, channel_dim: int = 1) -> torch.Tensor:
    """Sum a full-size gradient back to a broadcast parameter's ``shape`` (adjoint of the broadcast)."""
    if grad.shape == shape:
        return grad
    full = list(grad.shape)
    # Channel groups: (.., C, ..) -> (.., Cg, G, ..) and sum over G.
    pc = shape[channel_dim]
    if pc != full[channel_dim]:
        split = [*full[:channel_dim], pc, full[channel_dim] // pc, *full[channel_dim + 1 :]]
        grad = grad.reshape(split).sum(channel_dim + 1)
    dims = [i for i, (g, s) in enumerate(zip(grad.shape, shape, strict=True)) if s == 1 and g != 1]
    if dims:
        grad = grad.sum(dims, keepdim=True)
    return grad
