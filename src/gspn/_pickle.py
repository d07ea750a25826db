"""Reading ``torch.save`` archives without running code: an allow-list unpickler.

A ``torch.save`` file is a zip archive holding a pickle (``<folder>/data.pkl``) and one record per
tensor storage (``<folder>/data/<key>``). Unpickling an arbitrary pickle can call any importable
function (``os.system`` included), so a checkpoint from the internet must never go through plain
``pickle`` / ``torch.load(weights_only=False)``. ``torch.load``'s own ``weights_only`` mode refuses
the training checkpoints of the GSPN reference code (they pickle a ``yacs`` config and an
``argparse.Namespace``), so this module reads the archive itself with an unpickler whose
``find_class`` knows a fixed allow-list:

* tensors: ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_tensor`` / ``_rebuild_parameter`` and
  the ``torch.*Storage`` types (replaced by our own functions that only slice the stored bytes);
* containers: ``collections.OrderedDict``, ``builtins.set`` / ``frozenset`` (plain lists, dicts,
  tuples, strings and numbers need no global);
* **inert placeholders** for configuration objects: ``yacs.config.CfgNode`` (a ``dict`` subclass)
  and ``argparse.Namespace`` become :class:`InertDict` / :class:`InertObject` instances that hold
  the pickled data and run nothing — ``yacs`` need not be installed.

Any other global (``os.system``, ``builtins.eval``, ``subprocess.Popen``, a class of some package,
...) raises :class:`UnsafeCheckpointError` naming it, before anything is called. A file that is not
a complete ``torch.save`` zip archive raises :class:`CheckpointFormatError`.

Tensors can be read lazily (:class:`LazyTensor`: shape and dtype known, bytes read on
:meth:`LazyTensor.load`), so one entry of a multi-gigabyte training checkpoint can be loaded without
reading the optimizer state.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import math
import os
import pickle
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointFormatError",
    "InertDict",
    "InertObject",
    "LazyTensor",
    "TorchArchive",
    "UnsafeCheckpointError",
    "allowed_globals",
    "iter_lazy",
    "load_torch_archive",
    "materialize",
]


class UnsafeCheckpointError(pickle.UnpicklingError, ValueError):
    """A checkpoint's pickle refers to a global outside the allow-list (it could run code).

    Also a ``ValueError`` (bad input), so callers that report bad files report it too."""


class CheckpointFormatError(ValueError):
    """The file is not a complete, well-formed ``torch.save`` zip archive."""


# --- inert placeholders ---------------------------------------------------------------------------


class InertObject:
    """Stand-in for a pickled object of an allow-listed configuration class (``argparse.Namespace``).

    Unpickling only fills its ``__dict__``; attributes read as on the original (``args.image_size``).
    ``source_class`` names the class it replaces.
    """

    source_class = "object"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"<inert {self.source_class}({fields})>"


class InertDict(dict):
    """Stand-in for a pickled ``dict`` subclass of an allow-listed configuration class (yacs ``CfgNode``).

    Holds the items (and any instance attributes the pickle sets) and nothing else; items can also
    be read as attributes (``cfg.MODEL.TYPE``). ``source_class`` names the class it replaces.
    """

    source_class = "dict"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        if args and isinstance(args[0], Mapping):
            self.update(args[0])

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self) -> str:
        return f"<inert {self.source_class}{dict.__repr__(self)}>"


def _placeholder(base: type, module: str, name: str) -> type:
    return type(name, (base,), {"source_class": f"{module}.{name}", "__module__": __name__})


# --- lazy tensors ---------------------------------------------------------------------------------

_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}


class _StorageType:
    """The value ``find_class`` returns for ``torch.<X>Storage``: a dtype tag, not callable."""

    __slots__ = ("dtype", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _StorageRef:
    """A storage record of the archive, not yet read."""

    __slots__ = ("archive", "dtype", "key", "numel")

    def __init__(self, archive: TorchArchive, key: str, dtype: torch.dtype, numel: int) -> None:
        self.archive, self.key, self.dtype, self.numel = archive, key, dtype, numel


class LazyTensor:
    """A tensor of a :class:`TorchArchive` whose bytes are read on :meth:`load`.

    ``shape``, ``dtype``, ``ndim`` and ``numel()`` are available without reading anything.
    """

    __slots__ = ("_storage", "offset", "requires_grad", "shape", "stride")

    def __init__(
        self,
        storage: _StorageRef,
        offset: int,
        shape: tuple[int, ...],
        stride: tuple[int, ...],
        requires_grad: bool = False,
    ) -> None:
        self._storage = storage
        self.offset = offset
        self.shape = torch.Size(shape)
        self.stride = tuple(stride)
        self.requires_grad = requires_grad

    @property
    def dtype(self) -> torch.dtype:
        return self._storage.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def load(self) -> torch.Tensor:
        """Read the bytes (the archive must still be open): a CPU tensor owning its memory."""
        flat = self._storage.archive.read_storage(self._storage)
        t = torch.as_strided(flat, self.shape, self.stride, self.offset)
        return t if t.numel() == flat.numel() and t.is_contiguous() else t.clone()

    def __repr__(self) -> str:
        return f"LazyTensor(shape={tuple(self.shape)}, dtype={self.dtype})"


def _as_int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list, torch.Size)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise CheckpointFormatError(f"malformed tensor record: {what} {value!r}")
    return tuple(value)


def _rebuild_tensor(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> LazyTensor:
    """Allow-listed replacement of ``torch._utils._rebuild_tensor_v2`` (and ``_rebuild_tensor``)."""
    if not isinstance(storage, _StorageRef):
        raise CheckpointFormatError(f"malformed tensor record: storage {type(storage).__name__}")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise CheckpointFormatError(f"malformed tensor record: offset {offset!r}")
    shape, strides = _as_int_tuple(size, "size"), _as_int_tuple(stride, "stride")
    if len(shape) != len(strides):
        raise CheckpointFormatError(f"malformed tensor record: size {shape} with stride {strides}")
    if math.prod(shape) and offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) >= storage.numel:
        raise CheckpointFormatError(
            f"malformed tensor record: size {shape}, stride {strides}, offset {offset} exceed the "
            f"{storage.numel} elements of storage {storage.key!r}"
        )
    return LazyTensor(storage, offset, shape, strides, bool(requires_grad))


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> Any:
    """Allow-listed replacement of ``torch._utils._rebuild_parameter``: the data, as a tensor."""
    return data


# --- the allow-list -------------------------------------------------------------------------------

_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("yacs.config", "CfgNode"): _placeholder(InertDict, "yacs.config", "CfgNode"),
    ("argparse", "Namespace"): _placeholder(InertObject, "argparse", "Namespace"),
}


def allowed_globals() -> list[str]:
    """The ``module.name`` globals a checkpoint pickle may refer to (besides ``torch.*Storage``)."""
    return sorted(f"{m}.{n}" for m, n in _ALLOWED)


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, archive: TorchArchive) -> None:
        super().__init__(file, encoding="utf-8")
        self._archive = archive

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        # Python 2 names that protocol-2 pickles use (``__builtin__.set``), mapped as pickle does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise UnsafeCheckpointError(
                f"{self._archive.path}: refusing to load the checkpoint: its pickle refers to "
                f"{module}.{name}, which is not on the allow-list of tensors, containers and inert "
                f"config objects ({', '.join(allowed_globals())}); loading it could run arbitrary code. "
                "Nothing from the file was executed."
            ) from None

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise CheckpointFormatError(f"{self._archive.path}: unknown persistent record {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:]
        if not isinstance(storage_type, _StorageType):
            raise CheckpointFormatError(f"{self._archive.path}: malformed storage record {pid!r:.80}")
        if isinstance(key, bytes):
            key = key.decode("ascii")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise CheckpointFormatError(f"{self._archive.path}: malformed storage record {pid!r:.80}")
        return _StorageRef(self._archive, key, storage_type.dtype, numel)


# --- the archive ----------------------------------------------------------------------------------


class TorchArchive:
    """An open ``torch.save`` zip archive, unpickled through the allow-list.

    Use as a context manager; :class:`LazyTensor`\\ s of the archive can be loaded while it is open.

    Raises:
        CheckpointFormatError: not a zip archive (e.g. truncated, or a legacy pre-1.6 ``torch.save``
            file), no ``data.pkl`` record, or big-endian data.
        FileNotFoundError: the path does not exist.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"checkpoint {str(self.path)!r} does not exist")
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise CheckpointFormatError(
                f"{self.path}: not a complete torch.save archive ({exc}); the file may be truncated "
                "(an interrupted download or copy) or in the legacy pre-1.6 format"
            ) from exc
        pickles = [n for n in self._zip.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            self._zip.close()
            raise CheckpointFormatError(f"{self.path}: a torch.save archive has one data.pkl record, found {pickles}")
        self.prefix = pickles[0][: -len("data.pkl")]
        byteorder = self._read_small(self.prefix + "byteorder")
        if byteorder not in (None, b"little"):
            self._zip.close()
            raise CheckpointFormatError(f"{self.path}: {byteorder!r}-endian archives are not supported")
        self._cache: dict[str, torch.Tensor] = {}

    def _read_small(self, name: str) -> bytes | None:
        try:
            return self._zip.read(name)
        except KeyError:
            return None

    def __enter__(self) -> TorchArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file; lazy tensors can no longer be loaded."""
        self._cache.clear()
        self._zip.close()

    def load(self) -> Any:
        """Unpickle the archive's object with every tensor as a :class:`LazyTensor`.

        Raises:
            UnsafeCheckpointError: the pickle refers to a global outside the allow-list.
            CheckpointFormatError: the pickle is malformed.
        """
        try:
            data = self._zip.read(self.prefix + "data.pkl")
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise CheckpointFormatError(f"{self.path}: cannot read data.pkl ({exc})") from exc
        try:
            return _AllowListUnpickler(io.BytesIO(data), self).load()
        except (UnsafeCheckpointError, CheckpointFormatError):
            raise
        except Exception as exc:  # a malformed pickle can fail in many ways; none of them ran code
            raise CheckpointFormatError(f"{self.path}: malformed pickle ({type(exc).__name__}: {exc})") from exc

    def read_storage(self, ref: _StorageRef) -> torch.Tensor:
        """The 1-D tensor of storage ``ref`` (cached while the archive is open)."""
        if ref.key in self._cache:
            return self._cache[ref.key]
        name = f"{self.prefix}data/{ref.key}"
        itemsize = torch.empty((), dtype=ref.dtype).element_size()
        nbytes = ref.numel * itemsize
        try:
            info = self._zip.getinfo(name)
        except KeyError:
            raise CheckpointFormatError(f"{self.path}: storage record {name!r} is missing") from None
        if info.file_size != nbytes:
            raise CheckpointFormatError(
                f"{self.path}: storage record {name!r} has {info.file_size} bytes, expected {nbytes}"
            )
        buf = bytearray(nbytes)
        try:
            with self._zip.open(info) as f:
                view, done = memoryview(buf), 0
                while done < nbytes:
                    n = f.readinto(view[done:])
                    if not n:
                        raise EOFError("unexpected end of record")
                    done += n
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise CheckpointFormatError(f"{self.path}: cannot read {name!r} ({exc}); the file may be corrupt") from exc
        flat = torch.frombuffer(buf, dtype=ref.dtype) if nbytes else torch.empty(0, dtype=ref.dtype)
        self._cache[ref.key] = flat
        return flat


def _walk(obj: Any, fn: Callable[[LazyTensor], Any]) -> Any:
    if isinstance(obj, LazyTensor):
        return fn(obj)
    if isinstance(obj, (InertDict, collections.OrderedDict)):
        out = type(obj)()
        for k, v in obj.items():
            out[k] = _walk(v, fn)
        if isinstance(obj, InertDict):
            out.__dict__.update({k: _walk(v, fn) for k, v in obj.__dict__.items()})
        return out
    if isinstance(obj, dict):
        return {k: _walk(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_walk(v, fn) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_walk(v, fn) for v in obj)
    return obj


def materialize(obj: Any) -> Any:
    """``obj`` with every :class:`LazyTensor` replaced by its loaded tensor (containers copied)."""
    return _walk(obj, LazyTensor.load)


def iter_lazy(obj: Any) -> Iterator[LazyTensor]:
    """Every :class:`LazyTensor` inside ``obj``."""
    found: list[LazyTensor] = []
    _walk(obj, found.append)
    return iter(found)


def load_torch_archive(path: str | os.PathLike) -> Any:
    """Load a ``torch.save`` file through the allow-list, every tensor read into CPU memory.

    Raises:
        UnsafeCheckpointError: the pickle refers to a global outside the allow-list (nothing ran).
        CheckpointFormatError: not a complete ``torch.save`` zip archive.
        FileNotFoundError: no such file.
    """
    with TorchArchive(path) as archive:
        return materialize(archive.load())
