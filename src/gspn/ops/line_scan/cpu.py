"""CPU backend of the line scan: the C++/OpenMP kernels of ``gspn/ops/csrc/line_scan.cpp``.

The library is built on first use (:mod:`gspn.ops._cpu`: compiler, cache folder, why it may be
unavailable); threads follow ``torch.get_num_threads()``. A :class:`gspn.ops.line_scan.ScanBackend`.
"""

from __future__ import annotations

import torch

from .._cpu import DTYPES, TensorArg, allocate, call, is_available, unavailable_reason
from ..directions import get_direction

__all__ = ["NATIVE_DTYPES", "allocate", "is_available", "scan", "scan_backward", "unavailable_reason"]

NATIVE_DTYPES = False
"""The kernels read float32/float64 only: the caller up-casts float16/bfloat16 inputs."""


def _arg(t: torch.Tensor, channels: int) -> TensorArg:
    batch_stride = t.stride(0) if t.shape[0] > 1 else 0
    return TensorArg(t.data_ptr(), batch_stride, t.stride(1), channels // t.shape[1])


def _args(tensors, channels: int):
    return (TensorArg * len(tensors))(*(_arg(t, channels) for t in tensors))


def _launch(
    kernel: str, x: torch.Tensor, direction: str, chunk_size, normalize: bool, flags: tuple[int, ...], tensors
) -> None:
    """Call ``gspn_scan_forward`` / ``gspn_scan_backward`` with the geometry of ``x``."""
    batch, channels, height, width = x.shape
    geometry = (DTYPES[x.dtype], get_direction(direction).index, batch, channels, height, width, chunk_size or 0)
    call(kernel, *geometry, int(normalize), *flags, torch.get_num_threads(), _args(tensors, channels))


def scan(x, lam, w_left, w_mid, w_right, *, direction, chunk_size, normalize, out):
    """Forward scan of one direction into ``out`` (see :class:`gspn.ops.line_scan.ScanBackend`)."""
    _launch("gspn_scan_forward", x, direction, chunk_size, normalize, (), (x, lam, w_left, w_mid, w_right, out))
    return out


def scan_backward(
    grad, h, x, lam, w_left, w_mid, w_right, *, direction, chunk_size, normalize, dx, accumulate_dx, d_params
):
    """Adjoint scan of one direction (see :class:`gspn.ops.line_scan.ScanBackend`)."""
    tensors = (grad, h, x, lam, w_left, w_mid, w_right, dx, *d_params)
    _launch("gspn_scan_backward", x, direction, chunk_size, normalize, (int(accumulate_dx),), tensors)
