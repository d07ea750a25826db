"""Triton backend of the line scan: one fused kernel launch per direction, forward and backward.

Selected by ``backend="triton"`` (and by ``"auto"`` for CUDA tensors). With ``TRITON_INTERPRET=1``
set before ``triton`` is first imported it also runs on CPU tensors through the Triton
interpreter, which is how the test suite exercises the kernels without a GPU. ``import gspn``
never needs triton: this module imports it lazily and reports itself unavailable without it.

Design and byte model: see ``README.md`` next to this file.

* Inputs are read in their own dtype (float32, bfloat16, float16, float64), the output is written
  in its dtype, and the state and all arithmetic are float32 (float64 for float64 outputs)
  (``NATIVE_DTYPES = True`` tells :mod:`gspn.ops.line_scan` not to up-cast beforehand).
* All four directions index the ``(H, W)`` plane in place; channel-shared / batch-shared
  parameters are read by index (batch stride 0, parameter channel ``c // (C / Cg)``).
* ``normalize=True`` evaluates the stability–context normalisation inside the kernels (the backward
  recomputes it and returns gradients w.r.t. the logits).
* Local GSPN tiles are independent and are spread over the second grid axis; when the planes are
  too few to fill the GPU (a global scan of ``(1, 8, 16384, 16384)``), each line is shared by
  several programs (the *split* variant).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

import torch

from ..directions import get_direction

__all__ = [
    "NATIVE_DTYPES",
    "allocate",
    "is_available",
    "launch_config",
    "launch_overrides",
    "scan",
    "scan_backward",
    "split_programs",
    "unavailable_reason",
]

NATIVE_DTYPES = True
"""The kernels read float32/float16/bfloat16/float64 directly; the caller must not up-cast."""

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_kernel_module: ModuleType | None = None
_import_error: str | None = None
_overrides: dict[str, Any] = {}
# (variant, BLOCK_P) that failed to build or run on this GPU (then: the memory variant), and
# ("pipelined", BLOCK_P) where the register variant only built without software pipelining.
_broken: set[tuple[str, int]] = set()

# Upper bounds of the tile a program holds in registers.
_GPU_MAX_BLOCK_P = 1024
# Lines up to 1024 positions use the register variant: at 2048 its sm_90 build spills (see
# benchmarks/triton_compile_check.py). The loops are not software-pipelined by Triton (no cp.async
# in the PTX), so num_stages stays 1; the forward register kernel prefetches one line by hand.
_GPU_MAX_REG_BLOCK_P = 1024
_GPU_NUM_STAGES = 1
_GPU_MAX_TILE = 2048
_INTERP_MAX_BLOCK_P = 256
_INTERP_MAX_TILE = 4096
# Split variant: windows of 256 or 512 positions, halo (= lines per time block) 1/16 of the window,
# so each program recomputes 2/14 of its segment again. Untuned: no GPU has run it yet.
_SPLIT_MIN_BLOCK_P = 256
_SPLIT_MAX_BLOCK_P = 512
_SPLIT_HALO_FRACTION = 16
_MAX_SCRATCH_BYTES = 256 << 20


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _load() -> ModuleType | None:
    """Import triton and the kernels once; ``None`` (with the reason kept) if that fails."""
    global _kernel_module, _import_error
    if _kernel_module is None and _import_error is None:
        try:
            _kernel_module = importlib.import_module("._kernels", __name__)
        except ImportError as exc:
            _import_error = f"triton is not installed ({exc}); pip install 'gspn[triton]'"
    return _kernel_module


def is_available(device: torch.device | str) -> bool:
    """True for CUDA tensors when triton is installed, and for CPU tensors under ``TRITON_INTERPRET=1``."""
    return unavailable_reason(device) == ""


def unavailable_reason(device: torch.device | str) -> str:
    """Empty string if the backend can run on ``device``, else why not."""
    device = torch.device(device)
    if device.type == "cpu":
        if not _interpreting():
            return "CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 before importing triton)"
    elif device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is available"
    else:
        return f"the triton backend does not support {device.type} tensors"
    if _load() is None:
        return _import_error or "triton could not be imported"
    return ""


_LAUNCH_KEYS = {"kernel", "block_s", "block_p", "halo", "chunk_programs", "num_warps", "num_stages"}
_KERNELS = ("auto", "register", "split", "memory")


@contextlib.contextmanager
def launch_overrides(**values: Any) -> Iterator[None]:
    """Force launch parameters for the calls inside the ``with`` block (tests and experiments).

    Keys: ``kernel`` (``"register"``, ``"split"`` or ``"memory"``), ``block_s``, ``block_p``,
    ``halo`` (split variant: lines per time block, also the halo width), ``chunk_programs``,
    ``num_warps``, ``num_stages``. Lets the CPU tests drive the multi-block line loop, the split of
    lines over programs and the split over tiles with small shapes.
    """
    unknown = set(values) - _LAUNCH_KEYS
    if unknown:
        raise ValueError(f"unknown launch parameters: {sorted(unknown)}")
    saved = dict(_overrides)
    _overrides.update(values)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


def launch_config(
    slices: int,
    line_length: int,
    num_chunks: int,
    device: torch.device,
    scratch_floats_per_line: int,
    kernel: str | None = None,
) -> dict[str, Any]:
    """Pick the kernel variant and its launch parameters for one call.

    On a GPU, ``"register"`` (state in registers, whole line of a plane in one program) is used
    when the line fits in one block (``P <= 1024``) and there are at least half as many programs
    (planes × tiles) as SMs; otherwise ``"split"`` (each line shared by several programs, which
    recompute a halo; time blocks chained through flags). In the interpreter: ``"register"`` for
    ``P <= 256``, else ``"memory"`` (state exchanged through memory, the line looped over in
    blocks). A variant that failed to build on this GPU falls back to ``"memory"``.
    ``GSPN_TRITON_KERNEL`` forces one.

    Args:
        slices: ``B·C``.
        line_length: ``P``, positions per line.
        num_chunks: number of tiles along the scan axis (1 for global GSPN).
        device: the tensors' device (CPU means the interpreter: as few programs as possible).
        scratch_floats_per_line: scratch floats per slice and tile program of the memory variant.
        kernel: force a variant (takes precedence over overrides and the environment).

    Returns:
        ``{"kernel", "block_s", "block_p", "halo", "chunk_programs", "num_warps", "num_stages"}``
        (``halo`` is 0 except for the split variant).
    """
    interp = device.type == "cpu"
    max_reg = _INTERP_MAX_BLOCK_P if interp else _GPU_MAX_REG_BLOCK_P
    kernel = kernel or _overrides.get("kernel") or os.environ.get("GSPN_TRITON_KERNEL", "auto")
    if kernel not in _KERNELS:
        raise ValueError(f"GSPN_TRITON_KERNEL must be one of {_KERNELS}, got {kernel!r}")
    block_p = _overrides.get("block_p")
    sms = 0 if interp else torch.cuda.get_device_properties(device).multi_processor_count
    if kernel == "auto":
        whole = _next_pow2(line_length)
        fits = whole <= (block_p or max_reg) and ("register", whole) not in _broken
        if interp:
            kernel = "register" if fits else "memory"
        elif fits and slices * num_chunks >= sms // 2:
            kernel = "register"
        else:
            kernel = "split"
    if kernel == "split":
        block_p = block_p or _split_block(line_length)
        if ("split", block_p) in _broken:
            kernel, block_p = "memory", None
    if kernel == "split":
        halo = _overrides.get("halo") or max(1, block_p // _SPLIT_HALO_FRACTION)
        if not 1 <= 3 * halo <= block_p:
            raise ValueError(f"the split kernel needs 1 <= 3 * halo <= block_p, got halo={halo}, block_p={block_p}")
        config = {
            "kernel": kernel, "block_s": 1, "block_p": block_p, "halo": halo, "chunk_programs": 1,
            "num_warps": 1 if interp else max(4, min(16, block_p // (32 * 4))), "num_stages": 1,
        }
        config.update({k: v for k, v in _overrides.items() if k in ("block_s", "num_warps", "num_stages")})
        return config
    if kernel == "register":
        block_p = _next_pow2(line_length)  # the whole line, whatever was asked
        scratch_floats_per_line = 0
    else:
        block_p = block_p or min(_next_pow2(line_length), max_reg if interp else _GPU_MAX_BLOCK_P)
    if interp:
        block_s = min(_next_pow2(slices), max(1, _INTERP_MAX_TILE // block_p))
        chunk_programs = 1
        num_warps = 1
    else:
        max_tile = _GPU_MAX_REG_BLOCK_P if kernel == "register" else _GPU_MAX_TILE
        block_s = min(_next_pow2(slices), max(1, max_tile // block_p))
        target = 4 * sms
        # Smaller slice groups until there are enough programs to fill the GPU.
        while block_s > 1 and _cdiv(slices, block_s) * num_chunks < target:
            block_s //= 2
        slice_programs = _cdiv(slices, block_s)
        if scratch_floats_per_line:
            chunk_programs = min(num_chunks, max(1, _cdiv(target, slice_programs)))
            per_program = slice_programs * block_s * scratch_floats_per_line * 4
            chunk_programs = max(1, min(chunk_programs, _MAX_SCRATCH_BYTES // max(per_program, 1)))
        else:
            chunk_programs = num_chunks
        # <= 4 elements per thread for the register variant (8 made its sm_90 build spill), <= 8 for
        # the memory variant.
        per_thread = 4 if kernel == "register" else 8
        num_warps = max(4, min(16, block_s * block_p // (32 * per_thread)))
    config: dict[str, Any] = {
        "kernel": kernel, "block_s": block_s, "block_p": block_p, "halo": 0, "chunk_programs": chunk_programs,
        "num_warps": num_warps, "num_stages": 1 if interp or ("pipelined", block_p) in _broken else _GPU_NUM_STAGES,
    }
    config.update({k: v for k, v in _overrides.items() if k not in ("kernel", "block_p", "halo")})
    config["chunk_programs"] = max(1, min(config["chunk_programs"], num_chunks, 65535))
    return config


def _split_block(line_length: int) -> int:
    """Window of the split variant: 512 positions (4 warps, ~150 registers per thread: three programs
    per SM, so one waiting for its neighbours or loading its first line does not leave the SM idle),
    256 for lines shorter than 512."""
    return max(_SPLIT_MIN_BLOCK_P, min(_SPLIT_MAX_BLOCK_P, _next_pow2(line_length) // 2))


def split_programs(slices: int, line_length: int, num_lines: int, cfg: dict[str, Any]) -> tuple[int, int, int, int]:
    """``(segment, segments per line, slice groups, time blocks)`` of a split launch; the grid has
    their product of programs (segments × groups × time blocks)."""
    segment = cfg["block_p"] - 2 * cfg["halo"]
    return segment, _cdiv(line_length, segment), _cdiv(slices, cfg["block_s"]), _cdiv(num_lines, cfg["halo"])


def _next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive integers."""
    return -(-a // b)


def allocate(shape: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output buffer (plain ``torch.empty``)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _acc_dtype(*tensors: torch.Tensor) -> tuple[torch.dtype, Any]:
    import triton.language as tl

    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64, tl.float64
    return torch.float32, tl.float32


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
    return d, batch * channels, num_lines, line_length, chunk, _cdiv(num_lines, chunk)


def _launch_gather_kernel(kernel, grid, args: tuple, kwargs: dict[str, Any], cfg: dict[str, Any], device) -> bool:
    """Launch a register or split kernel; ``False`` if it cannot be built here (use the memory variant).

    On a GPU, a compilation or resource error (these variants rely on ``tl.gather`` and on the
    software pipeliner, which a Triton version or GPU may not support, and may run out of shared
    memory with pipelining) is retried once without pipelining, then recorded for this variant and
    line block size with a warning. In the interpreter every error propagates.
    """
    stages = [cfg["num_stages"]] + ([1] if cfg["num_stages"] > 1 else [])
    for num_stages in stages:
        try:
            kernel[grid](*args, **kwargs, num_warps=cfg["num_warps"], num_stages=num_stages)
        except Exception as exc:
            if torch.device(device).type != "cuda" or not _recoverable(exc):
                raise
            error = exc
            continue
        if num_stages == 1 and cfg["num_stages"] > 1:
            _broken.add(("pipelined", cfg["block_p"]))
        return True
    _broken.add((cfg["kernel"], cfg["block_p"]))
    warnings.warn(
        f"gspn: the {cfg['kernel']} Triton line-scan kernel failed on this GPU for lines of up to "
        f"{cfg['block_p']} positions ({type(error).__name__}: {str(error)[:300]}); using the memory "
        "variant for them from now on",
        RuntimeWarning,
        stacklevel=3,
    )
    return False


def _launch_split(
    kernel, tensors: tuple, strides: tuple, flags: dict[str, Any], cfg: dict[str, Any],
    geometry: tuple[int, int, int], state_lines: int, state_dtype: torch.dtype,
) -> bool:
    """Launch a split kernel with its flags and ``state_lines`` scratch lines per slice; ``False``
    if it cannot be built here (see :func:`_launch_gather_kernel`).

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
    kwargs = {**flags, "BLOCK_S": cfg["block_s"], "BLOCK_P": cfg["block_p"]}
    return _launch_gather_kernel(kernel, (programs,), args, kwargs, cfg, device)


def _recoverable(exc: Exception) -> bool:
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    return isinstance(exc, (CompilationError, OutOfResources, RuntimeError))


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
    """Forward scan of one direction into ``out`` (see :mod:`gspn.ops.backends`).

    Args:
        x: ``(B, C, H, W)``; lam, w_*: ``(B or 1, C or Cg, H, W)``; out: ``(B, C, H, W)``, possibly
            a strided view (e.g. ``out[:, k]`` of a ``(B, 4, C, H, W)`` buffer). Every (H, W) plane
            dense row-major; any mix of the supported dtypes.
    """
    kernels = _checked_kernels(x, lam, w_left, w_mid, w_right, out)
    channels, width = x.shape[1], x.shape[3]
    d, slices, num_lines, line_length, chunk, num_chunks = _geometry(x, direction, chunk_size)
    acc_torch, acc = _acc_dtype(out)
    state_in_out = out.dtype == acc_torch
    strides = (
        *_slice_strides(x),
        *_param_args(channels, lam, w_left, w_mid, w_right),
        *_slice_strides(out),
        slices, channels, width, num_lines, line_length, chunk, num_chunks,
    )
    flags = {"VERTICAL": d.vertical, "REVERSE": d.reverse, "NORMALIZE": normalize, "ACC": acc}
    cfg = launch_config(slices, line_length, num_chunks, x.device, 0 if state_in_out else 2 * line_length)
    if cfg["kernel"] == "split":
        tensors = (x, lam, w_left, w_mid, w_right, out)
        geometry = (slices, line_length, num_lines)
        if _launch_split(kernels.line_scan_fwd_split_kernel, tensors, strides, flags, cfg, geometry, 2, acc_torch):
            return out
        cfg = launch_config(
            slices, line_length, num_chunks, x.device, 0 if state_in_out else 2 * line_length, kernel="memory"
        )
    if cfg["kernel"] == "register":
        grid = (_cdiv(slices, cfg["block_s"]), cfg["chunk_programs"])
        args = (x, lam, w_left, w_mid, w_right, out, *strides)
        kwargs = {**flags, "BLOCK_S": cfg["block_s"], "BLOCK_P": cfg["block_p"]}
        if _launch_gather_kernel(kernels.line_scan_fwd_reg_kernel, grid, args, kwargs, cfg, x.device):
            return out
        cfg = launch_config(
            slices, line_length, num_chunks, x.device, 0 if state_in_out else 2 * line_length, kernel="memory"
        )
    if state_in_out:
        state = out  # unused placeholder pointer
    else:
        numel = cfg["chunk_programs"] * slices * 2 * line_length
        state = torch.empty(numel, dtype=acc_torch, device=x.device)
    grid = (_cdiv(slices, cfg["block_s"]), cfg["chunk_programs"])
    kernels.line_scan_fwd_kernel[grid](
        x, lam, w_left, w_mid, w_right, out, state, *strides, **flags, STATE_IN_OUT=state_in_out,
        BLOCK_S=cfg["block_s"], BLOCK_P=cfg["block_p"], num_warps=cfg["num_warps"],
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
    """Adjoint scan of one direction (see :mod:`gspn.ops.backends`).

    Writes (or adds to, if ``accumulate_dx``) ``dL/dx`` into ``dx`` (``(B, C, H, W)``, any float
    dtype, may be strided between planes) and ``(d_lam, d_w_left, d_w_mid, d_w_right)`` into the
    four ``d_params`` buffers (``(B, C, H, W)``, any float dtype; w.r.t. the logits when
    ``normalize``). The kernels write dense buffers directly; a strided buffer (one direction of a
    ``(B, 4, C, H, W)`` gradient) is filled through a dense temporary.
    """
    kernels = _checked_kernels(grad, h, x, lam, w_left, w_mid, w_right, dx)
    _, channels, height, width = x.shape
    d, slices, num_lines, line_length, chunk, num_chunks = _geometry(x, direction, chunk_size)
    acc_torch, acc = _acc_dtype(grad, h, x, lam, w_left, w_mid, w_right, dx)
    grads = tuple(d if d.is_contiguous() else torch.empty_like(d, memory_format=torch.contiguous_format)
                  for d in d_params)
    args = (
        grad, h, x, lam, w_left, w_mid, w_right, dx, *grads,
    )
    strides = (
        *_slice_strides(grad), *_slice_strides(h), *_slice_strides(x),
        *_param_args(channels, lam, w_left, w_mid, w_right),
        *_slice_strides(dx),
        slices, channels, height, width, num_lines, line_length, chunk, num_chunks,
    )
    flags = {
        "VERTICAL": d.vertical, "REVERSE": d.reverse, "NORMALIZE": normalize,
        "ACCUMULATE_DX": accumulate_dx, "ACC": acc,
    }
    cfg = launch_config(slices, line_length, num_chunks, x.device, 6 * line_length)
    kwargs = {**flags, "BLOCK_S": cfg["block_s"], "BLOCK_P": cfg["block_p"]}
    if cfg["kernel"] == "split":
        geometry = (slices, line_length, num_lines)
        if _launch_split(kernels.line_scan_bwd_split_kernel, args, strides, flags, cfg, geometry, 6, acc_torch):
            _copy_back(grads, d_params)
            return
        cfg = launch_config(slices, line_length, num_chunks, x.device, 6 * line_length, kernel="memory")
    if cfg["kernel"] == "register":
        grid = (_cdiv(slices, cfg["block_s"]), cfg["chunk_programs"])
        kwargs = {**flags, "BLOCK_S": cfg["block_s"], "BLOCK_P": cfg["block_p"]}
        if _launch_gather_kernel(kernels.line_scan_bwd_reg_kernel, grid, (*args, *strides), kwargs, cfg, x.device):
            _copy_back(grads, d_params)
            return
        cfg = launch_config(slices, line_length, num_chunks, x.device, 6 * line_length, kernel="memory")
    state = torch.empty(cfg["chunk_programs"] * slices * 6 * line_length, dtype=acc_torch, device=x.device)
    grid = (_cdiv(slices, cfg["block_s"]), cfg["chunk_programs"])
    kernels.line_scan_bwd_kernel[grid](
        *args, state, *strides, **flags,
        BLOCK_S=cfg["block_s"], BLOCK_P=cfg["block_p"], num_warps=cfg["num_warps"],
    )
    _copy_back(grads, d_params)


def _copy_back(grads: Sequence[torch.Tensor], d_params: Sequence[torch.Tensor]) -> None:
    for g, d in zip(grads, d_params, strict=True):
        if g is not d:
            d.copy_(g)
