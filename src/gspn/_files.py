"""Crash-safe file writing and safe loading, shared by every file the library writes or reads back.

* :func:`atomic_write` / :func:`atomic_torch_save`: a file is written to a temporary file in the
  destination folder, flushed and fsync'ed, then moved into place with :func:`os.replace` (atomic on
  POSIX and Windows): a crash leaves either the previous file or the new one, never a truncated one.
  The file gets the permissions of a plain ``open(path, "w")`` (``0o666`` less the umask);
  :func:`clean_stale_temps` removes the temporary files a killed process left behind.
* :func:`safe_torch_load`: ``torch.load(weights_only=True)`` — a pickle that would run code (or
  build any object other than tensors and plain containers) is refused with
  :class:`UnsafeCheckpointError`, before anything runs.
* :func:`claim_run_dir`: one run folder belongs to one run — an existing run is refused unless the
  caller resumes or overwrites it, and the folder is locked while the run owns it.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ._pickle import UnsafeCheckpointError

__all__ = [
    "RunDir",
    "RunDirError",
    "UnsafeCheckpointError",
    "atomic_torch_save",
    "atomic_write",
    "check_output_dir",
    "check_output_file",
    "claim_run_dir",
    "clean_stale_temps",
    "safe_torch_load",
]

_TMP_SUFFIX = ".tmp"


def _file_mode() -> int:
    """``0o666`` less the process umask: the mode ``open(path, "w")`` would give a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[io.BufferedWriter], Any]) -> Path:
    """Call ``write(f)`` on a temporary file next to ``path``, then atomically rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    try:
        with contextlib.suppress(OSError):  # mkstemp creates 0600; honour the umask like open() does
            os.fchmod(fd, _file_mode())
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


def clean_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files (and folders) a killed writer left in ``folder``; returns them.

    Only names this module (``.NAME.XXXX.tmp``) or a directory swap (``.NAME.tmpPID`` / ``.NAME.oldPID``)
    create are touched. Call it while owning the folder (:func:`claim_run_dir` does).
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        name = p.name
        if not name.startswith(".") or name == ".gspn.lock":
            continue
        stem = name.rsplit(".", 1)[-1]
        if name.endswith(_TMP_SUFFIX) or (stem.startswith(("tmp", "old")) and stem[3:].isdigit()):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def safe_torch_load(path: str | os.PathLike[str], map_location: str | torch.device | None = "cpu") -> Any:
    """``torch.load`` that never runs code from the file (``weights_only=True``).

    Tensors, numbers, strings and plain containers load; a pickle naming any other global (for
    example ``os.system``) raises :class:`UnsafeCheckpointError` naming the file, and nothing in it runs;
    a file that is not a ``torch.save`` file (empty, cut short, text) raises ``ValueError``.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = str(exc).strip().splitlines()
        detail = next((line for line in lines if "GLOBAL" in line or "global" in line), "")
        if not detail:  # an opcode no pickle of torch.save holds: text, JSON, an image...
            raise ValueError(f"{os.fspath(path)}: not a checkpoint (not a torch.save file)") from None
        raise UnsafeCheckpointError(
            f"{os.fspath(path)}: refused to load: its pickle needs more than tensors and plain data, so it "
            f"could run code ({detail.strip()})"
        ) from None
    except (EOFError, IndexError, KeyError):
        raise ValueError(f"{os.fspath(path)}: not a checkpoint (empty, cut short or not a torch.save file)") from None
    except RuntimeError as exc:
        if "zip archive" not in str(exc) and "PytorchStreamReader" not in str(exc):
            raise
        raise ValueError(f"{os.fspath(path)}: not a checkpoint (a damaged torch.save archive)") from None


class RunDirError(ValueError):
    """The output folder holds another run (or is locked by a running one)."""


class RunDir:
    """Ownership of a run folder (see :func:`claim_run_dir`): holds ``folder/.gspn.lock`` until
    :meth:`release` (or the end of a ``with`` block, or of the process)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.lock_path = folder / ".gspn.lock"
        self._fd: int | None = None

    def _acquire(self) -> None:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, _file_mode())
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; ownership is still checked by the files
            self._fd = fd
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunDirError(f"{self.folder} is in use by another running process") from None
        self._fd = fd

    def release(self) -> None:
        """Give the folder up (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_run_dir_free(
    folder: str | os.PathLike[str], run_files: Iterable[str], *, resume: bool, overwrite: bool
) -> list[str]:
    """The ``run_files`` present in ``folder``; writes nothing.

    Raises:
        RunDirError: some are present and neither ``resume`` nor ``overwrite`` is set.
    """
    folder = Path(folder)
    present = [name for name in run_files if (folder / name).exists()]
    if present and not resume and not overwrite:
        raise RunDirError(
            f"{folder} already holds a run ({', '.join(present)}); set `resume` to continue it or "
            "`overwrite` to replace it, or choose another output folder"
        )
    return present


def claim_run_dir(
    folder: str | os.PathLike[str],
    run_files: Iterable[str],
    *,
    resume: bool,
    overwrite: bool = False,
    lock: bool = True,
) -> RunDir:
    """Make ``folder`` this run's: create it, refuse another run's files, lock it, clean stale temps.

    Args:
        folder: the run's output folder.
        run_files: names of the files (or folders) a run writes there (``last.pt``, ``metrics.jsonl``, ...);
            any of them present means the folder holds a run.
        resume: the caller continues the run in the folder: its files are kept.
        overwrite: the caller replaces the run: those files are deleted.
        lock: hold an exclusive lock on ``folder/.gspn.lock`` until :meth:`RunDir.release`.

    Raises:
        RunDirError: (a ``ValueError``) the folder holds a run and neither ``resume`` nor ``overwrite``
            is set, or another process owns it.
        ValueError: ``folder`` cannot be a writable folder (:func:`check_output_dir`).
    """
    folder = check_output_dir(folder)
    folder.mkdir(parents=True, exist_ok=True)
    run = RunDir(folder)
    if lock:
        run._acquire()
    try:
        present = check_run_dir_free(folder, run_files, resume=resume, overwrite=overwrite)
        if present and not resume:
            for name in present:
                p = folder / name
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        clean_stale_temps(folder)
    except BaseException:
        run.release()
        raise
    return run


def check_output_file(path: str | os.PathLike[str], what: str = "output") -> Path:
    """Fail fast (``ValueError``) unless a file can be written at ``path``: not a folder, and its
    nearest existing parent is a writable folder. Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a file name")
    _check_creatable_dir(path.parent, what)
    return path


def check_output_dir(path: str | os.PathLike[str], what: str = "output folder") -> Path:
    """Fail fast (``ValueError``) unless ``path`` is, or can be created as, a writable folder. Creates nothing."""
    path = Path(path)
    _check_creatable_dir(path, what)
    return path


def _check_creatable_dir(path: Path, what: str) -> None:
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ValueError(f"{what} {path}: {probe} is a file, not a folder")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: {probe} is not writable")
