"""Fast CPU backend: a C++/OpenMP kernel compiled on first use and called through ctypes.

The sources (``gspn_cpu.cpp``: the line scan; ``gspn_mix.cpp``: the fused GSPN layer; the shared
``gspn_common.h``; no PyTorch headers) are compiled into one library once per machine with the system C++
compiler (``$CXX``, default ``c++``) using ``-O3 -march=native -fopenmp`` into
``$GSPN_CACHE_DIR`` (default ``$XDG_CACHE_HOME/gspn``, else ``~/.cache/gspn``; see
:func:`_cache_dir`); later processes load the cached library in milliseconds. If no compiler is
found, or the cache directory cannot be written, the backend reports itself unavailable and
``"auto"`` falls back to the reference backend with a warning. Threads follow
``torch.get_num_threads()``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from ..directions import get_direction

_DIR = Path(__file__).parent
_SOURCES = sorted(_DIR.glob("*.cpp"))
_HEADERS = sorted(_DIR.glob("*.h"))
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-std=c++17", "-shared", "-fPIC"]
_HUGEPAGE_MIN_BYTES = 8 << 20
_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_error: str | None = None


class _TensorArg(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("stride_b", ctypes.c_int64),
        ("stride_c", ctypes.c_int64),
        ("chan_div", ctypes.c_int64),
    ]


def _cache_dir() -> Path:
    """Where the compiled kernel library is cached.

    ``$GSPN_CACHE_DIR`` when set and non-empty (``~`` expanded); else ``$XDG_CACHE_HOME/gspn``;
    else ``~/.cache/gspn``. As the XDG Base Directory spec says, an empty or relative
    ``$XDG_CACHE_HOME`` is ignored (otherwise it would build a fresh library into ``./gspn`` of
    every working directory).
    """
    explicit = os.environ.get("GSPN_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path(os.path.expanduser("~/.cache"))
    return base / "gspn"


def _unwritable_cache(directory: Path, exc: OSError) -> RuntimeError:
    """One-line error for a cache directory that cannot be created or written to."""
    why = exc.strerror or type(exc).__name__
    return RuntimeError(
        f"cannot write the gspn kernel cache directory {str(directory)!r} ({why}); "
        "set GSPN_CACHE_DIR to a writable directory"
    )


def _prepare_cache_dir(directory: Path) -> None:
    """Create ``directory`` (and parents), or raise :func:`_unwritable_cache`'s error."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _unwritable_cache(directory, exc) from exc


def _cpu_signature() -> str:
    """Identifies the host CPU, since the library is built with -march=native."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("flags", "model name"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "".join(lines)


def _compile(compiler: str, output: Path) -> None:
    base = [compiler, *_FLAGS, *(str(s) for s in _SOURCES), "-o"]
    attempts = [[*base[:-2], "-fopenmp", *base[-2:]], base]  # without OpenMP as a fallback
    errors = []
    for cmd in attempts:
        try:
            scratch = tempfile.TemporaryDirectory(dir=output.parent)
        except OSError as exc:  # the folder exists but is not writable
            raise _unwritable_cache(output.parent, exc) from exc
        with scratch as tmp:
            target = Path(tmp) / output.name
            proc = subprocess.run([*cmd, str(target)], capture_output=True, text=True)
            if proc.returncode == 0:
                os.replace(target, output)  # atomic: concurrent processes never see half a file
                return
            errors.append(f"$ {' '.join(cmd)} {target}\n{proc.stderr.strip()}")
    raise RuntimeError("compiling the gspn CPU kernel failed:\n" + "\n".join(errors))


def _load() -> ctypes.CDLL | None:
    global _library, _error
    if _library is not None or _error is not None:
        return _library
    with _lock:
        if _library is not None or _error is not None:
            return _library
        try:
            requested = os.environ.get("CXX")
            compiler = shutil.which(requested) if requested else (shutil.which("c++") or shutil.which("g++"))
            if compiler is None:
                wanted = f"$CXX={requested!r}" if requested else "c++ or g++"
                raise RuntimeError(f"no C++ compiler found ({wanted}); install g++ or set $CXX")
            version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
            key = hashlib.sha256(
                b"\0".join(
                    s.encode()
                    for s in (
                        *(f.read_text() for f in (*_SOURCES, *_HEADERS)),
                        " ".join(_FLAGS),
                        version,
                        _cpu_signature(),
                    )
                )
            ).hexdigest()[:16]
            path = _cache_dir() / f"gspn_cpu_{key}.{'dylib' if sys.platform == 'darwin' else 'so'}"
            if not path.exists():
                _prepare_cache_dir(path.parent)
                _compile(compiler, path)
            lib = ctypes.CDLL(str(path))
            lib.gspn_scan_forward.argtypes = (
                [ctypes.c_int] * 2
                + [ctypes.c_int64] * 5
                + [
                    ctypes.c_int,
                    ctypes.c_int,
                    ctypes.POINTER(_TensorArg),
                ]
            )
            lib.gspn_scan_backward.argtypes = (
                [ctypes.c_int] * 2
                + [ctypes.c_int64] * 5
                + [
                    ctypes.c_int,
                    ctypes.c_int,
                    ctypes.c_int,
                    ctypes.POINTER(_TensorArg),
                ]
            )
            lib.gspn_advise_hugepages.argtypes = [ctypes.c_void_p, ctypes.c_int64]
            geometry = [ctypes.c_int] + [ctypes.c_int64] * 6 + [ctypes.c_int] + [ctypes.c_int64] * 3
            lib.gspn_mix_forward.argtypes = geometry + [ctypes.c_void_p] * 5
            lib.gspn_mix_backward.argtypes = geometry + [ctypes.c_void_p] * 10
            _library = lib
        except (OSError, RuntimeError) as exc:
            _error = str(exc)
    return _library


def is_available(device: torch.device) -> bool:
    """True for CPU tensors once the kernel library is built (builds it on the first call)."""
    return torch.device(device).type == "cpu" and _load() is not None


def unavailable_reason(device: torch.device) -> str:
    """``""`` for CPU tensors once the kernel library is built (builds it on the first call), else
    why not: not a CPU tensor, or the compiler's error."""
    if torch.device(device).type != "cpu":
        return "the 'cpu' backend only runs on CPU tensors"
    _load()
    return _error or ""


_DTYPES = {torch.float32: 0, torch.float64: 1}
NATIVE_DTYPES = False
"""The kernels read float32/float64 only: the caller up-casts float16/bfloat16 inputs."""


def _arg(t: torch.Tensor, channels: int) -> _TensorArg:
    batch_stride = t.stride(0) if t.shape[0] > 1 else 0
    return _TensorArg(t.data_ptr(), batch_stride, t.stride(1), channels // t.shape[1])


def allocate(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` whose large buffers are backed by transparent huge pages where the OS allows.

    On Linux a fresh multi-MB buffer costs one page fault per 4 KiB at first touch, which for a
    memory-bound scan can take as long as the scan itself; huge pages cut that cost several-fold.
    """
    out = torch.empty(shape, dtype=dtype, device=device)
    nbytes = out.numel() * out.element_size()
    lib = _load()
    if lib is not None and nbytes >= _HUGEPAGE_MIN_BYTES:
        lib.gspn_advise_hugepages(out.data_ptr(), nbytes)
    return out


def _args(tensors, channels: int):
    return (_TensorArg * len(tensors))(*(_arg(t, channels) for t in tensors))


def _launch(
    kernel: str, x: torch.Tensor, direction: str, chunk_size, normalize: bool, flags: tuple[int, ...], tensors
) -> None:
    """Call ``gspn_scan_forward`` / ``gspn_scan_backward`` with the geometry of ``x``."""
    batch, channels, height, width = x.shape
    geometry = (_DTYPES[x.dtype], get_direction(direction).index, batch, channels, height, width, chunk_size or 0)
    rc = getattr(_load(), kernel)(*geometry, int(normalize), *flags, torch.get_num_threads(), _args(tensors, channels))
    if rc != 0:
        raise RuntimeError(f"gspn CPU kernel {kernel} failed with code {rc}")


def scan(x, lam, w_left, w_mid, w_right, *, direction, chunk_size, normalize, out):
    """Forward scan of one direction into ``out`` (see :mod:`gspn.ops.backends`)."""
    _launch("gspn_scan_forward", x, direction, chunk_size, normalize, (), (x, lam, w_left, w_mid, w_right, out))
    return out


def scan_backward(
    grad, h, x, lam, w_left, w_mid, w_right, *, direction, chunk_size, normalize, dx, accumulate_dx, d_params
):
    """Adjoint scan of one direction (see :mod:`gspn.ops.backends`)."""
    tensors = (grad, h, x, lam, w_left, w_mid, w_right, dx, *d_params)
    _launch("gspn_scan_backward", x, direction, chunk_size, normalize, (int(accumulate_dx),), tensors)


# --- the fused GSPN layer (gspn_mix.cpp) -----------------------------------------------------------


def mix_lanes() -> int:
    """Channels per work item of the fused layer kernel; the caller pads C to a multiple of it."""
    return _load().gspn_mix_lanes()


def mix_x_strides(x: torch.Tensor, padded: int) -> tuple[int, int, int] | None:
    """``(batch, channel, pixel)`` element strides under which the fused kernel reads ``x (B, C, H, W)``
    in place, or ``None`` if it must be copied to a dense channels-last ``(B, H, W, padded)`` first.

    In place: channels-last dense (channel stride 1, pixel stride ``C``) or planar dense (pixel
    stride 1, channel stride ``H·W``), both only when ``C == padded``.
    """
    batch, channels, height, width = x.shape
    if channels != padded:
        return None
    sb = x.stride(0) if batch > 1 else 0
    if x.is_contiguous(memory_format=torch.channels_last) and (channels == 1 or x.stride(1) == 1):
        return sb, 1, channels
    if x.is_contiguous() and (height * width == 1 or x.stride(3) == 1):
        return sb, height * width, 1
    return None


def _mix_geometry(out_cl: torch.Tensor, x_strides, state: int, chunk_size) -> tuple:
    """Kernel arguments from a ``(B, H, W, Cp)`` output buffer's shape."""
    batch, height, width, padded = out_cl.shape
    return (
        _DTYPES[out_cl.dtype],
        batch,
        padded,
        height,
        width,
        state,
        chunk_size or 0,
        torch.get_num_threads(),
        *x_strides,
    )


def _call_mix(kernel: str, geometry: tuple, tensors) -> None:
    rc = getattr(_load(), kernel)(*geometry, *(t.data_ptr() for t in tensors))
    if rc != 0:
        raise RuntimeError(f"gspn CPU kernel {kernel} failed with code {rc}")


def mix_forward(x, x_strides, z_cl, w, d, chunk_size, y) -> None:
    """Fused layer forward into ``y (B, H, W, Cp)``; ``x`` read with ``x_strides`` (see
    :func:`mix_x_strides`); other layouts in ``gspn_mix.cpp`` (see :mod:`gspn.ops.gspn_mix`)."""
    geometry = _mix_geometry(y, x_strides, z_cl.shape[3], chunk_size)
    _call_mix("gspn_mix_forward", geometry, (x, z_cl, w, d, y))


def mix_backward(x, x_strides, z_cl, w, d, grad_cl, chunk_size, dx, dz_part, dw_part, dd_part) -> None:
    """Fused layer backward into ``dx`` and the per-item partial sums (see ``gspn_mix.cpp``).

    Allocates the recomputation scratch, ``H·W·lanes`` values per thread, through torch (so memory
    profilers see it); threads = ``min(torch.get_num_threads(), work items)``.
    """
    batch, height, width, padded = dx.shape
    lanes = mix_lanes()
    geometry = list(_mix_geometry(dx, x_strides, z_cl.shape[3], chunk_size))
    threads = max(1, min(geometry[7], batch * padded // lanes))
    geometry[7] = threads
    scratch = torch.empty((threads, height * width * lanes), dtype=dx.dtype, device=dx.device)
    tensors = (x, z_cl, w, d, grad_cl, dx, dz_part, dw_part, dd_part, scratch)
    _call_mix("gspn_mix_backward", tuple(geometry), tensors)
