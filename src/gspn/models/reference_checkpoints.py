"""The authors' GSPN checkpoints (NVlabs/GSPN): read them safely, convert them, compute what they compute.

The reference code publishes ImageNet-1K classifiers GSPN-T/S/B on the Hugging Face Hub
(``whj363636/GSPN``: ``tiny.pth``, ``small.pth``, ``base.pth``; **the authors report** 83.0 / 83.8 /
84.3 % top-1 at 224² — not measured here). Its generator training writes checkpoints of the same
kind for GSPN-DiT. Both are training checkpoints (``torch.save`` of a dict):

* classifier: ``model`` (the weights the reference evaluates — our default), ``model_ema``,
  ``optimizer``, ``lr_scheduler``, ``scaler``, ``epoch``, ``max_accuracy``, ``max_accuray_ema``
  and ``config`` (a pickled ``yacs`` ``CfgNode``);
* generator: ``model``, ``ema`` (what the reference's sampler loads — our default), ``opt`` and
  ``args`` (an ``argparse.Namespace``).

They are read through :mod:`gspn._pickle`'s allow-list unpickler (nothing in the file can run), only
the chosen entry's tensors are read, names and values are converted to this library's layout
(:func:`convert_reference_state`), and the model is built with the **reference semantics**
(:func:`reference_model_args`) so that it computes what the reference computes:

=============================== ================================ ===================================
what                            this library's default           reference (``semantics="reference"``)
=============================== ================================ ===================================
GSPN merge of the 4 directions  same pixel (``merge_frame``      scan frames, parameters at the frame
                                ``="image"``)                    index (``merge_frame="scan"``)
gate normalisation              sums to 1 (``stabilize``)        sum clamped at 1e-7 (with "scan")
SiLU after the depthwise conv   yes (``conv_act=True``)          no (``conv_act=False``)
LayerNorm eps                   1e-6                             1e-5 (DiT final layer: 1e-6)
classifier "global" blocks      whole map (chunk ``None``)       chunk = configured feature size
                                                                 (``global_chunk_sizes``)
DiT wiring                      residual blocks                  ``(hidden, residual)`` pairs
                                                                 (``wiring="hidden_residual"``)
DiT global out-blocks           last 2                           none (``num_global_blocks=0``)
=============================== ================================ ===================================

Each family's key map (names, value conversion, reference options, what its tensor shapes say)
stands next to its model: :mod:`gspn.models.gspn_vision_keys`, :mod:`gspn.models.gspn_dit_keys`
(:class:`gspn.models._reference_keys.ReferenceKeyMap`); the GSPN layer's channel order, shared by
both, is :func:`gspn.models._reference_keys.convert_gspn_value`. This module reads, fits, loads,
downloads and plans; :func:`gspn.models.convert.convert_checkpoint` (``gspn convert``) writes one of
our files from one of theirs.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._pickle import InertObject, LazyTensor, TorchArchive
from ._reference_keys import ReferenceKeyMap
from .gspn_dit_keys import GENERATOR_KEYS
from .gspn_vision_keys import CLASSIFIER_KEYS

__all__ = [
    "DEFAULT_ENTRY",
    "SEMANTIC_KEYS",
    "PretrainedPlan",
    "ReferenceCheckpoint",
    "convert_reference_state",
    "download_reference_checkpoint",
    "fit_state_dict",
    "infer_model_args",
    "infer_reference_model",
    "key_map",
    "load_reference_checkpoint",
    "model_kind",
    "plan_pretrained",
    "read_reference_checkpoint",
    "reference_model_args",
]

_FAMILIES: dict[str, ReferenceKeyMap] = {f.kind: f for f in (CLASSIFIER_KEYS, GENERATOR_KEYS)}
_KINDS = tuple(_FAMILIES)

DEFAULT_ENTRY: dict[str, str] = {kind: f.default_entry for kind, f in _FAMILIES.items()}
"""Entry loaded by default: what the reference's own evaluation (classifier) / sampler (generator) loads."""

SEMANTIC_KEYS = frozenset(k for f in _FAMILIES.values() for k in f.reference_args)
"""Constructor options that change what a model computes without changing its parameters."""


def key_map(kind: str) -> ReferenceKeyMap:
    """The key map of the reference family ``kind`` (``"classifier"`` or ``"generator"``).

    Raises:
        ValueError: unknown ``kind``.
    """
    try:
        return _FAMILIES[kind]
    except KeyError:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}") from None


def reference_model_args(kind: str, feat_sizes: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Constructor options that reproduce the reference code's semantics (the family's
    :attr:`~gspn.models._reference_keys.ReferenceKeyMap.reference_args`).

    Args:
        kind: ``"classifier"`` (:class:`~gspn.models.GSPNClassifier`) or ``"generator"``
            (:class:`~gspn.models.GSPNDiT`).
        feat_sizes: classifier only: the reference's configured feature size per stage, the chunk
            of its "global" blocks (default ``(56, 28, 14, 7)``, i.e. 224² input).

    Raises:
        ValueError: unknown ``kind``.
    """
    args = dict(key_map(kind).reference_args)
    if feat_sizes and "global_chunk_sizes" in args:
        args["global_chunk_sizes"] = tuple(feat_sizes)
    return args


def model_kind(model_or_name: nn.Module | str) -> str:
    """``"generator"`` for diffusion models (``default_cfg["task"] == "diffusion"``), else ``"classifier"``."""
    if isinstance(model_or_name, str):
        from ._registry import get_default_cfg

        cfg = get_default_cfg(model_or_name)
    else:
        cfg = getattr(model_or_name, "default_cfg", {}) or {}
    return "generator" if cfg.get("task") == "diffusion" else "classifier"


# --- reading -------------------------------------------------------------------------------------


def _is_tensor(v: Any) -> bool:
    return isinstance(v, (torch.Tensor, LazyTensor))


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(k, str) and _is_tensor(v) for k, v in obj.items())


def _kind_of_keys(keys: list[str]) -> str | None:
    """The family whose reference tensor names ``keys`` are (ours are none)."""
    return next((kind for kind, f in _FAMILIES.items() if f.recognises(keys)), None)


@dataclass
class ReferenceCheckpoint:
    """A reference checkpoint read through the allow-list, tensors not yet loaded.

    Attributes:
        path: the file.
        kind: ``"classifier"`` or ``"generator"`` (from the tensor names).
        entries: the state-dict entries (``("model", "model_ema")``, ``("model", "ema")``, or ``()``
            for a bare state dict).
        config: the pickled config (an inert ``CfgNode`` / ``Namespace`` stand-in) or ``None``.
        obj: the whole unpickled object (tensors as :class:`gspn._pickle.LazyTensor`).
    """

    path: Path
    kind: str
    entries: tuple[str, ...]
    config: Any
    obj: Any = field(repr=False)

    def entry_name(self, entry: str | None = None) -> str | None:
        """The entry to load: ``entry``, or the default of the kind; ``None`` for a bare state dict.

        Raises:
            ValueError: ``entry`` is not in the file (the message lists the entries it has).
        """
        if not self.entries:
            if entry is not None:
                raise ValueError(f"{self.path} is a bare state dict: it has no entry {entry!r} to choose")
            return None
        wanted = entry or DEFAULT_ENTRY[self.kind]
        if wanted in self.entries:
            return wanted
        aliases = {"ema": "model_ema", "model_ema": "ema"}
        if entry is not None and aliases.get(entry) in self.entries:
            return aliases[entry]
        raise ValueError(
            f"{self.path} has no {wanted!r} entry to load (its state-dict entries: {', '.join(self.entries)}); "
            "choose one with pretrained_entry= (CLI: --entry)"
        )

    def state_dict(self, entry: str | None = None) -> dict[str, LazyTensor | torch.Tensor]:
        """The (lazy) state dict of ``entry`` (see :meth:`entry_name`)."""
        name = self.entry_name(entry)
        return dict(self.obj if name is None else self.obj[name])


def read_reference_checkpoint(archive: TorchArchive) -> ReferenceCheckpoint:
    """Unpickle an open archive (allow-list, lazy) and recognise its layout.

    Raises:
        gspn._pickle.UnsafeCheckpointError: the pickle refers to a global outside the allow-list.
        gspn._pickle.CheckpointFormatError: not a complete ``torch.save`` archive.
        ValueError: no GSPN reference state dict in it (the message says what was found).
    """
    path = archive.path
    obj = archive.load()
    if _is_state_dict(obj):
        entries: tuple[str, ...] = ()
        keys = list(obj)
    elif isinstance(obj, Mapping):
        entries = tuple(k for k, v in obj.items() if isinstance(k, str) and _is_state_dict(v))
        if not entries:
            raise ValueError(
                f"{path} holds no state dict (top-level keys: {', '.join(map(str, list(obj)[:12]))}); "
                "expected a GSPN reference checkpoint (entries 'model'/'model_ema' or 'model'/'ema')"
            )
        keys = list(obj[entries[0]])
    else:
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict or state dict")
    kind = _kind_of_keys(keys)
    if kind is None:
        ours = any(k.startswith(("stem.", "stages.", "head.")) for k in keys)
        hint = " — these are this library's names: load it with gspn.models.load_checkpoint" if ours else ""
        raise ValueError(
            f"{path} is not a GSPN reference checkpoint: its tensor names ({', '.join(keys[:4])}, ...) are "
            f"neither the classifier's (patch_embed.*, layers.*) nor the generator's (x_embedder.*, in_blocks.*){hint}"
        )
    config = None
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        config = obj.get("config", obj.get("args"))
    return ReferenceCheckpoint(path=path, kind=kind, entries=entries, config=config, obj=obj)


def _wrong_kind(ref: ReferenceCheckpoint, arch: str, kind: str) -> ValueError:
    """The error for a reference checkpoint of another family than model ``arch``'s (``kind``)."""
    return ValueError(
        f"{ref.path} is a reference {ref.kind} checkpoint but {arch} is a {kind}: build a {ref.kind} "
        f"({_FAMILIES[ref.kind].suggest})"
    )


def _config_value(config: Any, key: str) -> Any:
    """First value of ``key`` anywhere in an inert config tree (``None`` when absent)."""
    if isinstance(config, InertObject):
        config = config.__dict__
    if isinstance(config, Mapping):
        if key in config:
            return config[key]
        for v in config.values():
            if isinstance(v, (Mapping, InertObject)):
                found = _config_value(v, key)
                if found is not None:
                    return found
    return None


def _file_defaults(ref: ReferenceCheckpoint) -> dict[str, Any]:
    """Options the file's own config fixes (e.g. the classifier's feature sizes, the generator's latent size)."""
    return _FAMILIES[ref.kind].file_defaults(lambda key: _config_value(ref.config, key))


# --- conversion ----------------------------------------------------------------------------------


def convert_reference_state(state: Mapping[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """Rename a reference state dict to this library's names and reorder the GSPN channels.

    Shapes that differ only by size-1 dimensions (GRN's ``(1, C, 1, 1)`` γ/β, 1×1 convs stored as
    Linear weights) are adapted by :func:`fit_state_dict`, against the target model.

    Args:
        state: reference tensor name → tensor (any device, ``meta`` included).
        kind: ``"classifier"`` or ``"generator"``.

    Returns:
        this library's name → tensor.

    Raises:
        ValueError: a tensor the reference model does not have (named), or a malformed GSPN tensor.
    """
    family = key_map(kind)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        name = family.map_name(key)
        if name is None:
            unknown.append(key)
            continue
        out[name] = family.convert_value(name, value, key)
    if unknown:
        raise ValueError(
            f"{len(unknown)} tensor(s) of the file have no counterpart in a reference GSPN {kind}: {_names(unknown)}"
        )
    return out


def _names(keys: list[str], limit: int = 6) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _squeezed(shape: torch.Size) -> tuple[int, ...]:
    return tuple(n for n in shape if n != 1)


def fit_state_dict(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str = "the checkpoint",
    hint: Callable[[], str] | None = None,
    allow_head_mismatch: bool = True,
) -> dict[str, torch.Tensor]:
    """Check that the converted ``state`` fits ``model`` exactly and adapt size-1 dimensions.

    With ``allow_head_mismatch`` the classifier (``model.default_cfg["classifier"]``) may differ —
    another number of classes, a headless model: the caller's loader drops it with a warning
    (``gspn.models.checkpoint``). Every other tensor must be present, known and of the model's
    shape (up to size-1 dimensions).

    Returns:
        ``state`` with shapes adapted to the model's.

    Raises:
        ValueError: missing, unexpected or differently shaped tensors, all named (first few of
            each), followed by ``hint()``.
    """
    from .checkpoint import classifier_prefixes

    heads = tuple(f"{h}." for h in classifier_prefixes(model)) if allow_head_mismatch else ()
    own = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    mismatched = []
    for k, v in state.items():
        target = own.get(k)
        if target is None or v.shape == target.shape:
            out[k] = v
        elif v.numel() == target.numel() and _squeezed(v.shape) == _squeezed(target.shape):
            out[k] = v.reshape(target.shape)
        elif heads and k.startswith(heads):
            out[k] = v  # a classifier of another size: the loader's head rule decides
        else:
            mismatched.append(f"{k}: file {list(v.shape)} vs model {list(target.shape)}")
    missing = [k for k in own if k not in state and not k.startswith(heads or ("\0",))]
    unexpected = [k for k in state if k not in own and not k.startswith(heads or ("\0",))]
    if mismatched or missing or unexpected:
        arch = getattr(model, "default_cfg", {}).get("architecture", type(model).__name__)
        parts = []
        if mismatched:
            parts.append(
                f"{len(mismatched)} tensor(s) differ in shape ({'; '.join(mismatched[:4])}"
                + (f"; ... {len(mismatched) - 4} more)" if len(mismatched) > 4 else ")")
            )
        if missing:
            parts.append(f"{len(missing)} model tensor(s) missing from the file ({_names(missing, 4)})")
        if unexpected:
            parts.append(f"{len(unexpected)} file tensor(s) the model does not have ({_names(unexpected, 4)})")
        raise ValueError(f"{source} does not fit {arch}: {'; '.join(parts)}.{hint() if hint else ''}")
    return out


# --- architecture inference ----------------------------------------------------------------------


def infer_model_args(state: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """Constructor arguments that the reference tensor shapes determine (names as in our models).

    Classifier: ``embed_dim, depths, d_state, in_chans, expand, mlp_ratio, kernel_size,
    num_classes``; generator: ``hidden_size, depth, patch_size, in_channels, d_state, kernel_size,
    num_classes, learn_sigma`` (the family's ``infer_args``). Options without parameters (which
    blocks are global, ...) cannot be inferred. Works on lazy or meta tensors.
    """
    return key_map(kind).infer_args({k: tuple(v.shape) for k, v in state.items()})


def _matching_models(state: Mapping[str, Any], kind: str) -> list[str]:
    """Registered models of ``kind`` whose default configuration the file's tensors fit (meta device)."""
    from ._registry import create_model, get_default_cfg, list_models

    converted = convert_reference_state(
        {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}, kind
    )
    found = []
    num_classes = infer_model_args(state, kind).get("num_classes")
    extra = {} if num_classes is None else {"num_classes": num_classes}
    for name in list_models("gspn_*"):
        if model_kind(name) != kind or not get_default_cfg(name).get("reference_semantics", True):
            continue  # e.g. gspn_vit_*: no reference code, so no reference checkpoint can fit
        with torch.device("meta"):
            model = create_model(name, **reference_model_args(kind), **extra)
        own = model.state_dict()
        if set(own) == set(converted) and all(
            _squeezed(own[k].shape) == _squeezed(v.shape) for k, v in converted.items()
        ):
            found.append(name)
    return found


def _hint(state: Mapping[str, Any], kind: str) -> Callable[[], str]:
    def hint() -> str:
        args = infer_model_args(state, kind)
        fits: list[str] = []
        with contextlib.suppress(ValueError):
            fits = _matching_models(state, kind)
        shown = ", ".join(f"{k}={v!r}" for k, v in args.items())
        which = f" — that is {' / '.join(fits)}" if fits else ""
        return f" The file's tensors say {shown}{which}; pass that model name or these overrides to create_model."

    return hint


# --- loading -------------------------------------------------------------------------------------


def load_reference_checkpoint(
    model: nn.Module, path: str | os.PathLike, *, entry: str | None = None, check_only: bool = False
) -> dict[str, Any]:
    """Load a reference checkpoint into ``model`` (converted; strict except for a classifier mismatch).

    Only the chosen entry's tensors are read. The model should have been built with
    :func:`reference_model_args` (``create_model(..., pretrained=path)`` does that) to compute what
    the reference computes.

    Args:
        model: a :class:`~gspn.models.GSPNClassifier` or :class:`~gspn.models.GSPNDiT`.
        path: a reference ``.pth`` (training checkpoint or bare state dict).
        entry: ``"model"`` / ``"model_ema"`` (classifier) or ``"model"`` / ``"ema"`` (generator);
            default :data:`DEFAULT_ENTRY`.
        check_only: only check names and shapes (``model`` may be on the meta device); read no data.

    Returns:
        what was loaded: ``{"file", "checkpoint_entry", "checkpoint_kind"}``.

    Raises:
        gspn._pickle.UnsafeCheckpointError: the file's pickle could run code (refused, nothing ran).
        gspn._pickle.CheckpointFormatError: truncated or not a ``torch.save`` archive.
        ValueError: wrong kind of model (classifier file into a generator or the reverse), missing
            entry, or tensors that do not fit the model (named, with the configuration they imply).
    """
    from .checkpoint import load_weights

    kind = model_kind(model)
    arch = getattr(model, "default_cfg", {}).get("architecture", type(model).__name__)
    with TorchArchive(path) as archive:
        ref = read_reference_checkpoint(archive)
        if ref.kind != kind:
            raise _wrong_kind(ref, arch, kind)
        name = ref.entry_name(entry)
        lazy = ref.state_dict(entry)
        source = f"{ref.path}" + (f" (entry {name!r})" if name else "")
        # Names and shapes first, on the meta device: a wrong model fails before any data is read.
        meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in lazy.items()}
        heads = kind == "classifier"  # a classifier may be re-headed; a generator's output layer may not
        fit_state_dict(
            model, convert_reference_state(meta, kind), source=source, hint=_hint(lazy, kind), allow_head_mismatch=heads
        )
        info = {"file": str(ref.path), "checkpoint_entry": name or "state_dict", "checkpoint_kind": ref.kind}
        if check_only:
            return info
        tensors = {k: v.load() if isinstance(v, LazyTensor) else v for k, v in lazy.items()}
    state = fit_state_dict(model, convert_reference_state(tensors, kind), source=source, allow_head_mismatch=heads)
    load_weights(model, state, strict=True, skip_mismatched_head=heads)
    return info


# --- the hub -------------------------------------------------------------------------------------


def _offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if env.strip().lower() in ("1", "on", "yes", "true"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.is_offline_mode())


def download_reference_checkpoint(filename: str, repo_id: str, revision: str | None = None) -> Path:
    """The local path of ``repo_id/filename``: from the Hugging Face cache, else downloaded into it.

    The cache (``HF_HUB_CACHE`` / ``HF_HOME``, as ``huggingface_hub`` resolves it) is tried first,
    without network; a download is attempted only when the file is not cached and offline mode
    (``HF_HUB_OFFLINE=1``) is off.

    Raises:
        ImportError: ``huggingface_hub`` is not installed (says what to install).
        RuntimeError: offline and not cached, or the download failed (says how to get the file).
    """
    manual = (
        f"download it on a connected machine (`hf download {repo_id} {filename}` fills the cache; or "
        f"https://huggingface.co/{repo_id}/resolve/main/{filename}) and pass pretrained='path/to/{filename}'"
    )
    try:
        from huggingface_hub import constants as hf_constants
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ImportError(
            f"pretrained=True downloads {repo_id}/{filename} from the Hugging Face Hub, which needs "
            f"huggingface_hub: pip install 'gspn[hub]' (or pip install huggingface_hub); or {manual}"
        ) from None
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError and relatives)
        pass
    cache = hf_constants.HF_HUB_CACHE
    if _offline():
        raise RuntimeError(
            f"{repo_id}/{filename} is not in the Hugging Face cache ({cache}) and offline mode is on "
            f"(HF_HUB_OFFLINE): {manual}"
        )
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except Exception as exc:
        raise RuntimeError(
            f"could not download {repo_id}/{filename} into the Hugging Face cache ({cache}): "
            f"{type(exc).__name__}: {exc}. {manual[0].upper()}{manual[1:]}"
        ) from exc


# --- create_model's pretrained= ------------------------------------------------------------------


@dataclass
class PretrainedPlan:
    """How ``create_model`` builds and loads a model for its ``pretrained`` argument.

    Attributes:
        model_args: options to apply under the user's overrides (the reference semantics for a
            reference checkpoint, the semantic options stored in one of our files, the file's config).
        overrides: the user's overrides minus ``pretrained_entry`` / ``semantics``.
        load: call with the built model to load the weights and record the source in its config.
        precheck: called with the model built on the meta device, to reject a checkpoint that does
            not fit before the real model is built and initialised (``None``: no check).
    """

    model_args: dict[str, Any]
    overrides: dict[str, Any]
    load: Callable[[nn.Module], None]
    precheck: Callable[[nn.Module], Any] | None = None

    def create(self, build: Callable[[], nn.Module]) -> nn.Module:
        """``build()`` the model (after a meta-device :attr:`precheck`), then :attr:`load` it."""
        if self.precheck is not None:
            with torch.device("meta"):
                probe = build()
            self.precheck(probe)
        model = build()
        self.load(model)
        return model


def _published() -> str:
    """The registered models with published reference weights, and where (``"gspn_b, ... (repo)"``)."""
    from ._registry import get_default_cfg, list_models

    cfgs = {name: get_default_cfg(name) for name in list_models()}
    names = [name for name, cfg in cfgs.items() if cfg.get("hf_hub_filename")]
    repos = sorted({cfgs[name]["hf_hub_id"] for name in names})
    return f"{', '.join(names)} ({', '.join(repos)})"


def _is_zip(path: Path) -> bool:
    """Whether the file starts like a zip archive (a ``torch.save`` file, possibly truncated)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def plan_pretrained(
    variant: str,
    kind: str,
    pretrained: bool | str | os.PathLike | None,
    overrides: dict[str, Any],
    default_cfg: dict[str, Any] | None = None,
) -> PretrainedPlan:
    """Resolve ``create_model(variant, pretrained=..., **overrides)`` before the model is built.

    ``kind`` is the reference family the model belongs to (``"classifier"`` or ``"generator"``) and
    ``default_cfg`` its registered configuration: its ``hf_hub_id`` / ``hf_hub_filename`` name the
    authors' published checkpoint, and ``reference_semantics=False`` marks a model that no reference
    code or checkpoint exists for (e.g. ``gspn_vit_*``).

    * ``pretrained=True``: the authors' checkpoint from the Hub (the cfg's ``hf_hub_id`` /
      ``hf_hub_filename``; :func:`download_reference_checkpoint`), reference semantics.
    * a ``torch.save`` archive (``.pth``): a reference checkpoint, reference semantics; the entry is
      ``overrides["pretrained_entry"]`` or :data:`DEFAULT_ENTRY`.
    * any other path: one of our safetensors files; semantic options stored in it
      (:data:`SEMANTIC_KEYS`, e.g. written by ``gspn convert``) apply.
    * ``overrides["semantics"]``: ``"reference"`` forces the reference options (also without
      weights), ``"aligned"`` keeps this library's defaults even for reference weights.

    Explicit overrides always win over these defaults.

    Raises:
        RuntimeError / ImportError: ``pretrained=True`` and the file cannot be had (see
            :func:`download_reference_checkpoint`), or no published weights for ``variant``.
        FileNotFoundError: the path does not exist.
        ValueError: bad ``semantics`` / ``pretrained_entry``, a checkpoint of the wrong kind, or
            reference semantics / a reference checkpoint for a model without reference code.
    """
    from .checkpoint import load_pretrained, read_metadata

    cfg = default_cfg or {}
    has_reference = cfg.get("reference_semantics", True)
    overrides = dict(overrides)
    entry = overrides.pop("pretrained_entry", None)
    semantics = overrides.pop("semantics", None)
    if semantics not in (None, "aligned", "reference"):
        raise ValueError(f"semantics must be 'aligned' or 'reference', got {semantics!r}")
    if semantics == "reference" and not has_reference:
        raise ValueError(f"{variant} has no reference semantics: its authors released no code")
    forced = reference_model_args(kind) if semantics == "reference" else {}

    def record(model: nn.Module, info: dict[str, Any]) -> None:
        cfg = getattr(model, "default_cfg", None)
        if isinstance(cfg, dict):
            cfg.update(info)

    if pretrained is None or pretrained is False:
        if entry is not None:
            raise ValueError("pretrained_entry needs pretrained= (a reference checkpoint)")
        return PretrainedPlan(forced, overrides, lambda model: None)

    hub: dict[str, Any] = {}
    if pretrained is True:
        repo_id, filename = cfg.get("hf_hub_id"), cfg.get("hf_hub_filename")
        if not (repo_id and filename):
            raise RuntimeError(
                f"no pretrained weights are published for {variant!r}: the authors publish the "
                f"classifiers {_published()}; pass pretrained='path/to/checkpoint' "
                "(a reference .pth or one of our .safetensors) to load other weights"
            )
        path = download_reference_checkpoint(filename, repo_id)
        hub = {"source": "hf-hub", "hf_hub_id": repo_id, "hf_hub_filename": filename}
    else:
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained checkpoint {str(path)!r} does not exist")

    if pretrained is not True and not _is_zip(path):
        # One of our safetensors files: the semantic options stored with it apply.
        if entry is not None:
            raise ValueError(f"pretrained_entry is for reference .pth checkpoints; {path} is not one")
        stored: dict[str, Any] = {}
        try:
            stored = json.loads(read_metadata(path).get("gspn.model_args", "{}"))
        except Exception:  # not safetensors: load_pretrained reports it
            stored = {}
        preset = {} if semantics == "aligned" else {k: v for k, v in stored.items() if k in SEMANTIC_KEYS}

        def load_ours(model: nn.Module) -> None:
            load_pretrained(model, path)
            record(model, {"source": "file", "file": str(path), "checkpoint_format": "gspn"})

        return PretrainedPlan({**preset, **forced}, overrides, load_ours)

    with TorchArchive(path) as archive:
        ref = read_reference_checkpoint(archive)
        ref.entry_name(entry)  # a missing entry fails before the model is built
    if ref.kind != kind:
        raise _wrong_kind(ref, variant, kind)
    if not has_reference:
        raise ValueError(f"{pretrained} is a reference GSPN {kind} checkpoint; it cannot fit {variant}")
    preset = _file_defaults(ref)
    if semantics == "aligned":  # the reference's weights with this library's semantics, on request
        preset = {k: v for k, v in preset.items() if k not in SEMANTIC_KEYS}
    else:
        preset = {**reference_model_args(kind), **preset}

    def load_reference(model: nn.Module) -> None:
        info = load_reference_checkpoint(model, path, entry=entry)
        record(
            model,
            {
                "source": "file",
                **hub,
                **info,
                "checkpoint_format": "reference",
                "semantics": "aligned" if semantics == "aligned" else "reference",
            },
        )

    def precheck(probe: nn.Module) -> None:
        load_reference_checkpoint(probe, path, entry=entry, check_only=True)

    return PretrainedPlan(preset, overrides, load_reference, precheck)


# --- which registered model a file is -----------------------------------------------------------


def infer_reference_model(path: str | os.PathLike) -> tuple[str, str]:
    """``(kind, registered model name)`` that a reference checkpoint fits with default options.

    Raises:
        ValueError: no registered model fits (the message gives the shapes' configuration); pass
            the model name and overrides explicitly then.
    """
    with TorchArchive(path) as archive:
        ref = read_reference_checkpoint(archive)
        state = ref.state_dict()
        fits = _matching_models(state, ref.kind)
        if len(fits) != 1:
            raise ValueError(
                f"cannot tell which model {ref.path} is ({'several fit: ' + ', '.join(fits) if fits else 'none fits'})."
                f"{_hint(state, ref.kind)()} (CLI: --model NAME --model-arg KEY=VALUE)"
            )
    return ref.kind, fits[0]
