"""Triton backend of the line scan: one fused kernel launch per direction, forward and backward.

A :class:`gspn.ops.line_scan.ScanBackend`, selected by ``backend="triton"`` (and by ``"auto"`` for
CUDA tensors). With ``TRITON_INTERPRET=1`` set before ``triton`` is first imported it also runs on
CPU tensors through the Triton interpreter, which is how the test suite exercises the kernels
without a GPU. ``import gspn`` never needs triton: the kernels (:mod:`.kernels`, one file per
variant) are imported on first use, and the backend reports itself unavailable without triton.
This module checks the arguments, builds the kernels' argument list (:func:`_kernel_args`) and
hands one launcher per variant to :func:`gspn.ops._triton.run_variants` (the launch policy, shared
with the fused layer). Design and byte model: ``gspn/ops/_triton/README.md``.

* Inputs are read in their own dtype (float32, bfloat16, float16, float64), the output is written
  in its dtype, and the state and all arithmetic are float32 (float64 for float64 outputs)
  (``NATIVE_DTYPES = True``: :func:`gspn.ops.line_scan.line_scan` does not up-cast beforehand).
* All four directions index the ``(H, W)`` plane in place; channel-shared / batch-shared
  parameters are read by index (batch stride 0, parameter channel ``c // (C / Cg)``).
* ``normalize=True`` evaluates the stability–context normalisation inside the kernels (the backward
  recomputes it and returns gradients w.r.t. the logits).
* Local GSPN tiles are independent and are spread over the second grid axis; when the planes are
  too few to fill the GPU (a global scan of ``(1, 8, 16384, 16384)``), each line is shared by
  several programs (the *split* variant).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import torch

from .._triton import acc_dtype, cdiv, device_unavailable_reason, run_variants, split_programs
from ..backends import plain_allocate as allocate
from ..directions import get_direction

__all__ = ["NATIVE_DTYPES", "allocate", "is_available", "scan", "scan_backward", "unavailable_reason"]

NATIVE_DTYPES = True
"""The kernels read float32/float16/bfloat16/float64 directly; the caller must not up-cast."""

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_kernel_module: ModuleType | None = None
_import_error: str | None = None


def _load() -> ModuleType | None:
    """Import triton and the kernels (:mod:`.kernels`) once; ``None`` (with the reason kept) if that
    fails. ``TRITON_INTERPRET`` is read when a kernel is defined, so this runs only once the device
    checks passed."""
    global _kernel_module, _import_error
    if _kernel_module is None and _import_error is None:
        try:
            _kernel_module = importlib.import_module(f"{__package__}.kernels")
        except ImportError as exc:
            _import_error = f"triton is not installed ({exc}); pip install 'gspn[triton]'"
    return _kernel_module


def is_available(device: torch.device | str) -> bool:
    """True for CUDA tensors when triton is installed, and for CPU tensors under ``TRITON_INTERPRET=1``."""
    return unavailable_reason(device) == ""


def unavailable_reason(device: torch.device | str) -> str:
    """Empty string if the backend can run on ``device``, else why not (imports triton on first call)."""
    reason = device_unavailable_reason(torch.device(device))
    if reason:
        return reason
    if _load() is None:
        return _import_error or "triton could not be imported"
    return ""


def _check(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype not in _DTYPES:
            raise TypeError(f"the triton backend does not support dtype {t.dtype}")
        h, w = t.shape[-2:]
        if (w > 1 and t.stride(-1) != 1) or (h > 1 and t.stride(-2) != w):
            raise ValueError("the triton backend needs every (H, W) plane dense row-major")


def _slice_strides(t: torch.Tensor) -> tuple[int, int]:
    """(batch, channel) strides; a size-1 (broadcast) batch gets stride 0."""
    return (t.stride(0) if t.shape[0] > 1 else 0), t.stride(1)


def _param_args(channels: int, *params: torch.Tensor) -> tuple[int, ...]:
    """``(batch stride, channel stride, channel divisor)`` of each parameter, concatenated: the
    kernels' ``*_sb, *_sc, *_div`` arguments (image channel ``c`` reads parameter channel
    ``c // divisor``)."""
    return tuple(v for t in params for v in (*_slice_strides(t), channels // t.shape[1]))


def _kernel_args(
    images: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    outputs: Sequence[torch.Tensor],
    sizes: Sequence[int],
) -> tuple[int, ...]:
    """The scalar arguments every line-scan kernel takes after its pointers, in their order (the one
    place that spells them): ``*_sb, *_sc`` of each input image tensor (``x``; ``g, h, x`` for the
    adjoint), ``*_sb, *_sc, *_div`` of λ and the three gates, ``*_sb, *_sc`` of each output
    (``out``; ``dx``), then ``sizes`` (``S, C, [H,] W, L, P, CHUNK, NUM_CHUNKS``; the split kernels
    replace ``NUM_CHUNKS`` by their segment sizes, :func:`_launch_split`)."""
    channels = sizes[1]  # C
    return (
        *(v for t in images for v in _slice_strides(t)),
        *_param_args(channels, *params),
        *(v for t in outputs for v in _slice_strides(t)),
        *sizes,
    )


def _checked_kernels(*tensors: torch.Tensor) -> ModuleType:
    """The kernel module, once ``tensors`` (all on one device) are checked (:func:`_check`)."""
    kernels = _load()
    assert kernels is not None, unavailable_reason(tensors[0].device)
    _check(*tensors)
    return kernels


def _geometry(x: torch.Tensor, direction: str, chunk_size: int | None):
    """Direction, slices ``B·C``, lines, line length, tile size and number of tiles of a scan of ``x``."""
    d = get_direction(direction)
    batch, channels, height, width = x.shape
    num_lines, line_length = (height, width) if d.vertical else (width, height)
    chunk = min(chunk_size or num_lines, num_lines)
    return d, batch * channels, num_lines, line_length, chunk, cdiv(num_lines, chunk)


def _launch(
    kernel, grid: tuple[int, ...], args: tuple, flags: dict[str, Any], cfg: dict[str, Any], stages: bool = True
) -> None:
    """``kernel[grid](*args, **flags)`` with the block sizes and warps of ``cfg`` (and its
    ``num_stages`` if ``stages``; the memory variant keeps Triton's default)."""
    options = {"num_warps": cfg["num_warps"], **({"num_stages": cfg["num_stages"]} if stages else {})}
    kernel[grid](*args, **flags, BLOCK_S=cfg["block_s"], BLOCK_P=cfg["block_p"], **options)


def _tile_grid(slices: int, cfg: dict[str, Any]) -> tuple[int, int]:
    """Grid of the register and memory variants: slice groups × tile programs."""
    return cdiv(slices, cfg["block_s"]), cfg["chunk_programs"]


def _launch_split(
    kernel,
    tensors: tuple,
    strides: tuple,
    flags: dict[str, Any],
    cfg: dict[str, Any],
    geometry: tuple[int, int, int],
    state_lines: int,
    state_dtype: torch.dtype,
) -> None:
    """Launch a split kernel with its flags and ``state_lines`` scratch lines per slice.

    ``strides``: the scalar arguments the other variants take (ending in ``NUM_CHUNKS``, which the
    split kernels replace by their segment and time-block sizes); ``geometry``: slices, line
    length, number of lines.
    """
    device = tensors[0].device
    slices, line_length, num_lines = geometry
    segment, num_seg, groups, time_blocks = split_programs(slices, line_length, num_lines, cfg)
    programs = time_blocks * groups * num_seg
    sync = torch.zeros(1 + programs, dtype=torch.int32, device=device)  # ticket counter, then flags
    state = torch.empty(slices * state_lines * line_length, dtype=state_dtype, device=device)
    args = (*tensors, state, sync, *strides[:-1], segment, cfg["halo"], num_seg, groups)
    _launch(kernel, (programs,), args, flags, cfg)


def _run_scan_variants(
    register_kernel: Any,
    split_kernel: Any,
    memory: Callable[[dict[str, Any]], None],
    tensors: tuple[torch.Tensor, ...],
    strides: tuple[Any, ...],
    flags: dict[str, Any],
    geometry: tuple[int, int, int, int],
    *,
    state_lines: int,
    acc_torch: torch.dtype,
    memory_scratch: int,
) -> None:
    """One scan pass (forward or adjoint) through :func:`run_variants`: the line in registers
    (``register_kernel``), a line split over several programs with ``state_lines`` lines of carried
    state each (``split_kernel``), or the ``memory`` launcher. ``geometry`` is ``(slices, line_length,
    num_lines, num_chunks)``; ``memory_scratch`` the memory variant's scratch floats per line."""
    slices, line_length, num_lines, num_chunks = geometry
    run_variants(
        {
            "register": lambda cfg: _launch(register_kernel, _tile_grid(slices, cfg), (*tensors, *strides), flags, cfg),
            "split": lambda cfg: _launch_split(
                split_kernel, tensors, strides, flags, cfg, (slices, line_length, num_lines), state_lines, acc_torch
            ),
            "memory": memory,
        },
        slices,
        line_length,
        num_chunks,
        tensors[0].device,
        memory_scratch,
    )


def scan(
    x: torch.Tensor,
    lam: torch.Tensor,
    w_left: torch.Tensor,
    w_mid: torch.Tensor,
    w_right: torch.Tensor,
    *,
    direction: str,
    chunk_size: int | None,
    normalize: bool,
    out: torch.Tensor,
) -> torch.Tensor:
    """Forward scan of one direction into ``out`` (see :class:`gspn.ops.line_scan.ScanBackend`).

    Args:
        x: ``(B, C, H, W)``; lam, w_*: ``(B or 1, C or Cg, H, W)``; out: ``(B, C, H, W)``, possibly
            a strided view (e.g. ``out[:, k]`` of a ``(B, 4, C, H, W)`` buffer). Every (H, W) plane
            dense row-major; any mix of float32, float16, bfloat16, float64.

    Returns:
        ``out``.

    Raises:
        TypeError: a tensor of another dtype. ValueError: a plane that is not dense row-major.
    """
    kernels = _checked_kernels(x, lam, w_left, w_mid, w_right, out)
    channels, width = x.shape[1], x.shape[3]
    d, slices, num_lines, line_length, chunk, num_chunks = _geometry(x, direction, chunk_size)
    acc_torch, acc = acc_dtype(out)
    state_in_out = out.dtype == acc_torch
    tensors = (x, lam, w_left, w_mid, w_right, out)
    params = (lam, w_left, w_mid, w_right)
    strides = _kernel_args((x,), params, (out,), (slices, channels, width, num_lines, line_length, chunk, num_chunks))
    flags = {"VERTICAL": d.vertical, "REVERSE": d.reverse, "NORMALIZE": normalize, "ACC": acc}

    def memory(cfg: dict[str, Any]) -> None:
        if state_in_out:
            state = out  # unused placeholder pointer
        else:
            state = torch.empty(cfg["chunk_programs"] * slices * 2 * line_length, dtype=acc_torch, device=x.device)
        _launch(
            kernels.line_scan_fwd_kernel,
            _tile_grid(slices, cfg),
            (*tensors, state, *strides),
            {**flags, "STATE_IN_OUT": state_in_out},
            cfg,
            stages=False,
        )

    _run_scan_variants(
        kernels.line_scan_fwd_reg_kernel,
        kernels.line_scan_fwd_split_kernel,
        memory,
        tensors,
        strides,
        flags,
        (slices, line_length, num_lines, num_chunks),
        state_lines=2,
        acc_torch=acc_torch,
        memory_scratch=0 if state_in_out else 2 * line_length,
    )
    return out


def scan_backward(
    grad: torch.Tensor,
    h: torch.Tensor,
    x: torch.Tensor,
    lam: torch.Tensor,
    w_left: torch.Tensor,
    w_mid: torch.Tensor,
    w_right: torch.Tensor,
    *,
    direction: str,
    chunk_size: int | None,
    normalize: bool,
    dx: torch.Tensor,
    accumulate_dx: bool,
    d_params: Sequence[torch.Tensor],
) -> None:
    """Adjoint scan of one direction (see :class:`gspn.ops.line_scan.ScanBackend`).

    Writes (or adds to, if ``accumulate_dx``) ``dL/dx`` into ``dx`` (``(B, C, H, W)``, any float
    dtype, may be strided between planes) and ``(d_lam, d_w_left, d_w_mid, d_w_right)`` into the
    four ``d_params`` buffers (``(B, C, H, W)``, any float dtype; w.r.t. the logits when
    ``normalize``). The kernels write dense buffers directly; a strided buffer (one direction of a
    ``(B, 4, C, H, W)`` gradient) is filled through a dense temporary.

    Raises:
        TypeError: a tensor of an unsupported dtype. ValueError: a plane that is not dense row-major.
    """
    kernels = _checked_kernels(grad, h, x, lam, w_left, w_mid, w_right, dx)
    _, channels, height, width = x.shape
    d, slices, num_lines, line_length, chunk, num_chunks = _geometry(x, direction, chunk_size)
    acc_torch, acc = acc_dtype(grad, h, x, lam, w_left, w_mid, w_right, dx)
    grads = tuple(
        g if g.is_contiguous() else torch.empty_like(g, memory_format=torch.contiguous_format) for g in d_params
    )
    tensors = (grad, h, x, lam, w_left, w_mid, w_right, dx, *grads)
    sizes = (slices, channels, height, width, num_lines, line_length, chunk, num_chunks)
    strides = _kernel_args((grad, h, x), (lam, w_left, w_mid, w_right), (dx,), sizes)
    flags = {
        "VERTICAL": d.vertical,
        "REVERSE": d.reverse,
        "NORMALIZE": normalize,
        "ACCUMULATE_DX": accumulate_dx,
        "ACC": acc,
    }

    def memory(cfg: dict[str, Any]) -> None:
        state = torch.empty(cfg["chunk_programs"] * slices * 6 * line_length, dtype=acc_torch, device=x.device)
        _launch(
            kernels.line_scan_bwd_kernel, _tile_grid(slices, cfg), (*tensors, state, *strides), flags, cfg, stages=False
        )

    _run_scan_variants(
        kernels.line_scan_bwd_reg_kernel,
        kernels.line_scan_bwd_split_kernel,
        memory,
        tensors,
        strides,
        flags,
        (slices, line_length, num_lines, num_chunks),
        state_lines=6,
        acc_torch=acc_torch,
        memory_scratch=6 * line_length,
    )
    for g, buffer in zip(grads, d_params, strict=True):
        if g is not buffer:
            buffer.copy_(g)
