"""The C++ library of the CPU backends: compiled on first use, loaded and called through ctypes.

The sources in ``csrc/`` (``line_scan.cpp``: the line scan, called by :mod:`gspn.ops.line_scan.cpu`;
``gspn_mix.cpp``: the fused GSPN layer, called by :mod:`gspn.ops.gspn_mix.cpu`; the shared
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

__all__ = ["DTYPES", "TensorArg", "allocate", "call", "is_available", "library", "unavailable_reason"]

_DIR = Path(__file__).parent / "csrc"
_SOURCES = sorted(_DIR.glob("*.cpp"))
_HEADERS = sorted(_DIR.glob("*.h"))
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-std=c++17", "-shared", "-fPIC"]
_HUGEPAGE_MIN_BYTES = 8 << 20
_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_error: str | None = None


class TensorArg(ctypes.Structure):
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
                    ctypes.POINTER(TensorArg),
                ]
            )
            lib.gspn_scan_backward.argtypes = (
                [ctypes.c_int] * 2
                + [ctypes.c_int64] * 5
                + [
                    ctypes.c_int,
                    ctypes.c_int,
                    ctypes.c_int,
                    ctypes.POINTER(TensorArg),
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


DTYPES = {torch.float32: 0, torch.float64: 1}
"""The kernels' dtype codes: they read float32/float64 only (the callers up-cast half types)."""


def library() -> ctypes.CDLL:
    """The loaded library (built on first call); only call once :func:`is_available` holds."""
    lib = _load()
    assert lib is not None, _error
    return lib


def call(kernel: str, *args) -> None:
    """Call the library function ``kernel``; a non-zero return code raises."""
    rc = getattr(library(), kernel)(*args)
    if rc != 0:
        raise RuntimeError(f"gspn CPU kernel {kernel} failed with code {rc}")


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
