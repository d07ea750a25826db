"""Crash-safe file writing, shared by every checkpoint and weight file the library writes.

A file is written to a temporary file in the destination folder, flushed and fsync'ed, then moved
into place with :func:`os.replace` (atomic on POSIX and Windows): a crash leaves either the previous
file or the new one, never a truncated one.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_torch_save", "atomic_write"]


def atomic_write(path: str | os.PathLike[str], write: Callable[[io.BufferedWriter], Any]) -> Path:
    """Call ``write(f)`` on a temporary file next to ``path``, then atomically rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows it
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Atomically ``torch.save`` ``obj`` to ``path``."""
    return atomic_write(path, lambda f: torch.save(obj, f))
