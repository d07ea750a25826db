"""What the Triton backends of every operator share (``gspn.ops.line_scan.triton``,
``gspn.ops.gspn_mix.triton``): the launch policy — which kernel variant runs, with which launch
parameters, and what happens when a variant cannot be built on this GPU —, the accumulation dtype,
where the kernels can run (:func:`device_unavailable_reason`), and (:mod:`.gates`) the
``@triton.jit`` helpers of both operators' kernels. Design and byte model: ``README.md`` here.

* :func:`launch_config` picks the variant (``"register"``, ``"split"`` or ``"memory"``) and its block
  sizes, warps and stages for one call; :func:`launch_overrides` and ``GSPN_TRITON_KERNEL`` force them.
* :func:`run_variants` is the one fallback chain of the forward and the adjoint: it launches the
  picked variant and, if a register or split kernel *cannot be built* here (:func:`cannot_build`),
  retries it once without software pipelining, then records it (for this process), warns once and
  launches the memory variant instead. Every other error — a CUDA fault such as an illegal memory
  access, a wrong argument, an interpreter error — propagates unchanged and records nothing: a
  fault must never be hidden behind the numbers of another kernel.

Imports nothing from triton at module level (``import gspn`` never needs triton).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

__all__ = [
    "acc_dtype",
    "cannot_build",
    "cdiv",
    "device_unavailable_reason",
    "interpreting",
    "launch_config",
    "launch_overrides",
    "next_pow2",
    "run_variants",
    "split_programs",
]

overrides: dict[str, Any] = {}
# (variant, BLOCK_P) that could not be built on this GPU (then: the memory variant), and
# ("pipelined", BLOCK_P) where the register/split variant only built without software pipelining.
broken_builds: set[tuple[str, int]] = set()

# Upper bounds of the tile a program holds in registers.
GPU_MAX_BLOCK_P = 1024
# Lines up to 1024 positions use the register variant: at 2048 its sm_90 build spills (see
# benchmarks/triton_compile_check.py). The loops are not software-pipelined by Triton (no cp.async
# in the PTX), so num_stages stays 1; the forward register kernel prefetches one line by hand.
GPU_MAX_REG_BLOCK_P = 1024
GPU_NUM_STAGES = 1
GPU_MAX_TILE = 2048
INTERP_MAX_BLOCK_P = 256
INTERP_MAX_TILE = 4096
# Split variant: windows of 256 or 512 positions, halo (= lines per time block) 1/16 of the window,
# so each program recomputes 2/14 of its segment again. Untuned: no GPU has run it yet.
_SPLIT_MIN_BLOCK_P = 256
_SPLIT_MAX_BLOCK_P = 512
_SPLIT_HALO_FRACTION = 16
MAX_SCRATCH_BYTES = 256 << 20

_LAUNCH_KEYS = {"kernel", "block_s", "block_p", "halo", "chunk_programs", "num_warps", "num_stages"}
_KERNELS = ("auto", "register", "split", "memory")
# The one compile failure Triton reports as a bare RuntimeError: an MLIR pass (e.g. the lowering of
# tl.gather for a layout this GPU or Triton version does not support) failing inside libtriton.
_PASS_FAILURE = "PassManager::run failed"


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` is set to a true value (the kernels then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def device_unavailable_reason(device: torch.device) -> str:
    """``""`` if Triton kernels can run on ``device`` (CUDA, or CPU under the interpreter), else why not."""
    if device.type == "cpu":
        if not interpreting():
            return "CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 before importing triton)"
    elif device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is available"
    else:
        return f"the triton backend does not support {device.type} tensors"
    return ""


def acc_dtype(*tensors: torch.Tensor) -> tuple[torch.dtype, Any]:
    """The accumulation dtype of a kernel reading ``tensors``, as torch and Triton dtypes: float64 if
    any of them is float64, else float32 (imports triton)."""
    import triton.language as tl

    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64, tl.float64
    return torch.float32, tl.float32


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 << max(n - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive integers."""
    return -(-a // b)


@contextlib.contextmanager
def launch_overrides(**values: Any) -> Iterator[None]:
    """Force launch parameters for the calls inside the ``with`` block (tests and experiments), for
    the line-scan kernels and the fused :func:`gspn.ops.gspn_mix` kernels alike (the latter take
    ``kernel="register"``/``"memory"``, ``block_s``, ``block_p``, ``chunk_programs``, ``num_warps``
    and ignore the rest).

    Keys: ``kernel`` (``"register"``, ``"split"`` or ``"memory"``), ``block_s``, ``block_p``,
    ``halo`` (split variant: lines per time block, also the halo width), ``chunk_programs``,
    ``num_warps``, ``num_stages``. Lets the CPU tests drive the multi-block line loop, the split of
    lines over programs and the split over tiles with small shapes.

    Raises:
        ValueError: an unknown key (the message lists the unknown ones).
    """
    unknown = set(values) - _LAUNCH_KEYS
    if unknown:
        raise ValueError(f"unknown launch parameters: {sorted(unknown)}")
    saved = dict(overrides)
    overrides.update(values)
    try:
        yield
    finally:
        overrides.clear()
        overrides.update(saved)


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
    blocks). A register or split variant that could not be built here for this line block size
    (see :func:`run_variants`) is replaced by ``"memory"``, forced or not. ``GSPN_TRITON_KERNEL``
    forces a variant.

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

    Raises:
        ValueError: ``GSPN_TRITON_KERNEL`` (or a forced kernel) not one of ``auto``, ``register``,
            ``split``, ``memory``; a split ``halo`` outside ``1 <= 3 * halo <= block_p``.
    """
    interp = device.type == "cpu"
    max_reg = INTERP_MAX_BLOCK_P if interp else GPU_MAX_REG_BLOCK_P
    kernel = kernel or overrides.get("kernel") or os.environ.get("GSPN_TRITON_KERNEL", "auto")
    if kernel not in _KERNELS:
        raise ValueError(f"GSPN_TRITON_KERNEL must be one of {_KERNELS}, got {kernel!r}")
    block_p = overrides.get("block_p")
    sms = 0 if interp else torch.cuda.get_device_properties(device).multi_processor_count
    whole = next_pow2(line_length)
    if kernel == "auto":
        fits = whole <= (block_p or max_reg) and ("register", whole) not in broken_builds
        if interp:
            kernel = "register" if fits else "memory"
        elif fits and slices * num_chunks >= sms // 2:
            kernel = "register"
        else:
            kernel = "split"
    elif kernel == "register" and ("register", whole) in broken_builds:
        kernel = "memory"
    if kernel == "split":
        block_p = block_p or _split_block(line_length)
        if ("split", block_p) in broken_builds:
            kernel, block_p = "memory", None
    if kernel == "split":
        halo = overrides.get("halo") or max(1, block_p // _SPLIT_HALO_FRACTION)
        if not 1 <= 3 * halo <= block_p:
            raise ValueError(f"the split kernel needs 1 <= 3 * halo <= block_p, got halo={halo}, block_p={block_p}")
        config = {
            "kernel": kernel,
            "block_s": 1,
            "block_p": block_p,
            "halo": halo,
            "chunk_programs": 1,
            "num_warps": 1 if interp else max(4, min(16, block_p // (32 * 4))),
            "num_stages": 1,
        }
        config.update({k: v for k, v in overrides.items() if k in ("block_s", "num_warps", "num_stages")})
        return config
    if kernel == "register":
        block_p = whole  # the whole line, whatever was asked
        scratch_floats_per_line = 0
    else:
        block_p = block_p or min(whole, max_reg if interp else GPU_MAX_BLOCK_P)
    if interp:
        block_s = min(next_pow2(slices), max(1, INTERP_MAX_TILE // block_p))
        chunk_programs = 1
        num_warps = 1
    else:
        max_tile = GPU_MAX_REG_BLOCK_P if kernel == "register" else GPU_MAX_TILE
        block_s = min(next_pow2(slices), max(1, max_tile // block_p))
        target = 4 * sms
        # Smaller slice groups until there are enough programs to fill the GPU.
        while block_s > 1 and cdiv(slices, block_s) * num_chunks < target:
            block_s //= 2
        slice_programs = cdiv(slices, block_s)
        if scratch_floats_per_line:
            chunk_programs = min(num_chunks, max(1, cdiv(target, slice_programs)))
            per_program = slice_programs * block_s * scratch_floats_per_line * 4
            chunk_programs = max(1, min(chunk_programs, MAX_SCRATCH_BYTES // max(per_program, 1)))
        else:
            chunk_programs = num_chunks
        # <= 4 elements per thread for the register variant (8 made its sm_90 build spill), <= 8 for
        # the memory variant.
        per_thread = 4 if kernel == "register" else 8
        num_warps = max(4, min(16, block_s * block_p // (32 * per_thread)))
    config: dict[str, Any] = {
        "kernel": kernel,
        "block_s": block_s,
        "block_p": block_p,
        "halo": 0,
        "chunk_programs": chunk_programs,
        "num_warps": num_warps,
        "num_stages": 1 if interp or ("pipelined", block_p) in broken_builds else GPU_NUM_STAGES,
    }
    config.update({k: v for k, v in overrides.items() if k not in ("kernel", "block_p", "halo")})
    config["chunk_programs"] = max(1, min(config["chunk_programs"], num_chunks, 65535))
    return config


def _split_block(line_length: int) -> int:
    """Window of the split variant: 512 positions (4 warps, ~150 registers per thread: three programs
    per SM, so one waiting for its neighbours or loading its first line does not leave the SM idle),
    256 for lines shorter than 512."""
    return max(_SPLIT_MIN_BLOCK_P, min(_SPLIT_MAX_BLOCK_P, next_pow2(line_length) // 2))


def split_programs(slices: int, line_length: int, num_lines: int, cfg: dict[str, Any]) -> tuple[int, int, int, int]:
    """``(segment, segments per line, slice groups, time blocks)`` of a split launch; the grid has
    their product of programs (segments × groups × time blocks)."""
    segment = cfg["block_p"] - 2 * cfg["halo"]
    return segment, cdiv(line_length, segment), cdiv(slices, cfg["block_s"]), cdiv(num_lines, cfg["halo"])


def cannot_build(exc: BaseException) -> bool:
    """True if ``exc`` says that a kernel cannot be *built* for this configuration on this GPU.

    Those are the errors Triton raises before anything runs on the device: a
    ``triton.compiler.errors.CompilationError`` (front end, e.g. ``tl.gather`` missing from an older
    Triton; includes ``CompileTimeAssertionFailure``), ``triton.runtime.errors.OutOfResources``
    (shared memory, registers or tensor memory over the GPU's limit), ``PTXASError`` (``ptxas``
    failed; Triton >= 3.2) and the ``RuntimeError("PassManager::run failed")`` of an MLIR pass.
    Anything else (CUDA faults, bad arguments, interpreter errors) is not: it must propagate.
    Triton's own autotuner skips a config on the same kind of errors.
    """
    from triton.compiler.errors import CompilationError
    from triton.runtime import errors

    build_errors: tuple[type[BaseException], ...] = (CompilationError, errors.OutOfResources)
    ptxas = getattr(errors, "PTXASError", None)
    if ptxas is not None:
        build_errors = (*build_errors, ptxas)
    if isinstance(exc, build_errors):
        return True
    return type(exc) is RuntimeError and str(exc).startswith(_PASS_FAILURE)


Launcher = Callable[[dict[str, Any]], object]
"""Launches one kernel variant with the launch parameters of a :func:`launch_config` dict."""


def run_variants(
    launchers: Mapping[str, Launcher],
    slices: int,
    line_length: int,
    num_chunks: int,
    device: torch.device,
    scratch_floats_per_line: int,
) -> dict[str, Any]:
    """Launch the variant :func:`launch_config` picks, falling back to the memory variant.

    ``launchers`` maps ``"register"``, ``"split"`` and ``"memory"`` to functions that launch that
    variant given its launch parameters; the other arguments are :func:`launch_config`'s. A register
    or split launch that fails with an error for which :func:`cannot_build` holds is retried once
    with ``num_stages=1`` (if it had more; success records ``("pipelined", BLOCK_P)`` so later calls
    start without pipelining), else the variant is recorded as broken for its ``BLOCK_P`` for the
    rest of the process, a ``RuntimeWarning`` is issued (once: later calls pick the memory variant
    directly) and the memory variant is launched. Every other exception propagates unchanged and
    records nothing. The memory variant has no fallback.

    Returns:
        The launch parameters of the variant that ran.
    """
    geometry = (slices, line_length, num_chunks, device, scratch_floats_per_line)
    cfg = launch_config(*geometry)
    if cfg["kernel"] != "memory":
        if _launch_or_record(launchers[cfg["kernel"]], cfg):
            return cfg
        cfg = launch_config(*geometry, kernel="memory")
    launchers["memory"](cfg)
    return cfg


def _launch_or_record(launch: Launcher, cfg: dict[str, Any]) -> bool:
    """Launch a register or split variant; ``False`` (recorded in ``broken_builds``, warned) if it cannot be
    built here even without pipelining. See :func:`run_variants`."""
    error: BaseException | None = None
    for num_stages in sorted({cfg["num_stages"], 1}, reverse=True):
        try:
            launch({**cfg, "num_stages": num_stages})
        except Exception as exc:
            if not cannot_build(exc):
                raise
            error = exc
            continue
        if num_stages < cfg["num_stages"]:
            broken_builds.add(("pipelined", cfg["block_p"]))
        return True
    broken_builds.add((cfg["kernel"], cfg["block_p"]))
    warnings.warn(
        f"gspn: the {cfg['kernel']} Triton line-scan kernel cannot be built on this GPU for lines of up to "
        f"{cfg['block_p']} positions ({type(error).__name__}: {str(error)[:300]}); using the memory "
        "variant for them from now on",
        RuntimeWarning,
        stacklevel=4,
    )
    return False
