"""The settings of ``gspn bench``: :class:`BenchConfig` (one field per flag) and their resolution.

``None`` in a size or budget field means "the default": the normal one, or the ``quick`` one, and for
``max_resolution`` and ``precision`` one that depends on the device. :func:`resolve_settings` fills them in
and checks everything before anything is measured or written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...training_utils import PRECISIONS, ConfigError, resolve_device
from .methods import METHODS

__all__ = ["BenchConfig", "check_methods", "resolutions_up_to", "resolve_settings"]


@dataclass
class BenchConfig:
    """One ``gspn bench`` run. A field's name is its flag's (``budget_seconds`` ↔ ``--budget-seconds``).

    Not a :class:`gspn.training_utils.RunConfig`: a benchmark has no state to resume, no seed its numbers
    depend on and no progress bar; it (re)writes a report into ``output_dir``. The fields it shares with a
    run config (``output_dir``, ``device``, ``threads``, ``quiet``, ``precision``) mean the same there.

    Fields:
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        precision: dtype of layers and inputs: ``"auto"`` (bfloat16 on CUDA, float32 elsewhere), ``"fp32"``,
            ``"bf16"`` or ``"fp16"`` (the layers run in that dtype, not under autocast).
        dim: layer width ``C`` (default 96; ``quick`` 32).
        heads: attention heads (default 3, head dim 32 as in Swin-T stage 1; ``quick`` 2).
        batch_size: inputs per call (default 1).
        d_state: GSPN proxy dimension.
        local_chunk: chunk size of local GSPN.
        gspn_backend: GSPN scan backend (``auto``, ``cpu``, ``triton``, ``reference``).
        methods: names from :data:`~.methods.METHODS`, or ``["all"]``; ``None``: :data:`~.methods.DEFAULT_METHODS`.
        backward: time forward+backward instead of forward only.
        threads: torch CPU threads during the run (``0``: leave torch's setting; restored afterwards).
        max_resolution: largest side (default 1024 on CPU, 16384 on CUDA; ``quick`` 256).
        min_resolution: smallest side (default 64; ``quick`` 32).
        resolutions: explicit sides (override ``min_resolution``/``max_resolution``).
        budget_seconds: time budget per configuration, warm-up included (default 10; ``quick`` 2).
        repeats: timed calls after the warm-up (default 5; ``quick`` 3).
        memory_limit_gb: skip configurations estimated above this (default: 80 % of available memory).
        fit_skip: smallest measured sizes left out of the exponent fits.
        memory: measure peak memory (on CPU one extra profiled call per configuration).
        quick: small and fast defaults (C=32, sides 32..256, 2 s budget, 3 repeats); explicit fields win.
        output_dir: folder of ``results.json``, ``table.md`` and ``scaling.png``.
        plot: write ``scaling.png`` (needs matplotlib).
        replot: measure nothing: re-render the tables, fits and plot of this earlier ``results.json``.
        quiet: no per-configuration progress lines.
    """

    device: str = "auto"
    precision: str = "auto"
    dim: int | None = None
    heads: int | None = None
    batch_size: int | None = None
    d_state: int = 8
    local_chunk: int = 2
    gspn_backend: str = "auto"
    methods: list[str] | None = None
    backward: bool = False
    threads: int = 0
    max_resolution: int | None = None
    min_resolution: int | None = None
    resolutions: list[int] | None = None
    budget_seconds: float | None = None
    repeats: int | None = None
    memory_limit_gb: float | None = None
    fit_skip: int = 1
    memory: bool = True
    quick: bool = False
    output_dir: str = "bench_out"
    plot: bool = True
    replot: str | None = None
    quiet: bool = False


# Defaults: (normal, quick). None means "depends on the device" (resolved in resolve_settings). The keys are
# those of ``results.json``'s "settings" block; _FIELD maps the ones whose config field has another name.
_DEFAULTS = {
    "channels": (96, 32),
    "heads": (3, 2),
    "batch": (1, 1),
    "min_resolution": (64, 32),
    "max_resolution": (None, 256),
    "budget_seconds": (10.0, 2.0),
    "repeats": (5, 3),
}
_FIELD = {"channels": "dim", "batch": "batch_size"}
_PRECISION_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolutions_up_to(min_side: int, max_side: int) -> list[int]:
    """``min_side, 2·min_side, 4·min_side, ...`` up to ``max_side`` (included even if not on the ladder)."""
    if min_side <= 0 or max_side < min_side:
        raise ValueError(f"need 0 < min_side <= max_side, got {min_side}, {max_side}")
    sides = []
    side = min_side
    while side <= max_side:
        sides.append(side)
        side *= 2
    if sides[-1] != max_side:
        sides.append(max_side)
    return sides


def check_methods(names: list[str]) -> None:
    """``names`` must be a non-empty list of :data:`~.methods.METHODS` names or ``"all"``.

    Raises:
        ConfigError: (field ``methods``) listing the unknown names and the valid ones.
    """
    valid = {m.name for m in METHODS} | {"all"}
    bad = [name for name in names if name not in valid]
    if bad or not names:
        raise ConfigError("methods", f"unknown method(s) {bad}; choose from {', '.join(sorted(valid))}")


def resolve_settings(config: BenchConfig) -> dict[str, Any]:
    """The measured settings of ``config`` (the ``settings`` block of ``results.json``): defaults that depend
    on ``quick`` and on the device filled in (explicit fields always win), everything checked.

    Keys: ``channels``, ``heads``, ``batch``, ``min_resolution``, ``max_resolution``, ``budget_seconds``,
    ``repeats``, ``device`` (the resolved device's name), ``dtype`` (``float32``/``bfloat16``/``float16``),
    ``resolutions``.

    Raises:
        ConfigError: a field the benchmark cannot run with (named by :attr:`ConfigError.field`).
    """
    s: dict[str, Any] = {key: getattr(config, _FIELD.get(key, key)) for key in _DEFAULTS}
    for key, (normal, quick) in _DEFAULTS.items():
        if s[key] is None:
            s[key] = quick if config.quick else normal
    device = resolve_device(config.device)
    s["device"] = str(device)
    if config.precision not in PRECISIONS:
        raise ConfigError("precision", f"must be one of {', '.join(PRECISIONS)}, not {config.precision!r}")
    if config.precision == "auto":
        s["dtype"] = "bfloat16" if device.type == "cuda" else "float32"
    else:
        s["dtype"] = _PRECISION_DTYPE[config.precision]
    if s["max_resolution"] is None:
        s["max_resolution"] = 16384 if device.type == "cuda" else 1024
    for key in ("channels", "heads", "batch", "repeats", "budget_seconds"):
        if s[key] <= 0:
            raise ConfigError(_FIELD.get(key, key), f"must be positive, got {s[key]}")
    if s["channels"] % s["heads"]:
        raise ConfigError("dim", f"{s['channels']} is not divisible by `heads` ({s['heads']})")
    for name in ("local_chunk", "d_state"):
        if getattr(config, name) <= 0:
            raise ConfigError(name, f"must be positive, got {getattr(config, name)}")
    if config.threads < 0:
        raise ConfigError("threads", f"must be >= 0, got {config.threads}")
    if config.fit_skip < 0:
        raise ConfigError("fit_skip", f"must be >= 0, got {config.fit_skip}")
    if config.memory_limit_gb is not None and config.memory_limit_gb <= 0:
        raise ConfigError("memory_limit_gb", f"must be positive, got {config.memory_limit_gb}")
    if config.methods is not None:
        check_methods(config.methods)
    if config.resolutions:
        if any(side <= 0 for side in config.resolutions):
            raise ConfigError("resolutions", f"sides must be positive, got {config.resolutions}")
        s["resolutions"] = list(config.resolutions)
    else:
        if s["min_resolution"] <= 0:
            raise ConfigError("min_resolution", f"must be positive, got {s['min_resolution']}")
        if s["max_resolution"] < s["min_resolution"]:
            raise ConfigError(
                "max_resolution", f"{s['max_resolution']} is below `min_resolution` ({s['min_resolution']})"
            )
        s["resolutions"] = resolutions_up_to(s["min_resolution"], s["max_resolution"])
    return s
