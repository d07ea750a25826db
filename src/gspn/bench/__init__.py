"""``gspn bench``: time one GSPN layer against attention, linear attention and Mamba as resolution grows.

Reproduces the shape of the GSPN paper's speed figure on the user's own hardware: for square inputs
of growing resolution it times one token-mixing layer of each method (see :mod:`gspn.bench.methods`
for exactly what is timed), skips configurations that would not fit in memory or in the time budget
(:mod:`gspn.bench.runner`), fits each method's scaling exponent in pixels, prints a table and the
attention/GSPN time ratio, and writes ``results.json``, ``table.md`` and ``scaling.png``.

Use it as ``gspn bench [options]`` (flags: :mod:`gspn.commands.bench`); ``--quick`` finishes in
well under a minute on a laptop CPU. :func:`run` takes the parsed options.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from .methods import (
    DEFAULT_METHODS,
    METHODS,
    BenchConfig,
    LinearAttention,
    MethodSpec,
    SelfAttention,
    iter_methods,
    linear_attention,
)
from .report import exponents, fit_exponent, format_table, ratios, write_json
from .runner import Result, benchmark

__all__ = [
    "DEFAULT_METHODS",
    "HELP",
    "METHODS",
    "BenchConfig",
    "LinearAttention",
    "MethodSpec",
    "Result",
    "SelfAttention",
    "benchmark",
    "exponents",
    "fit_exponent",
    "format_table",
    "linear_attention",
    "ratios",
    "resolutions_up_to",
    "run",
]

HELP = "time one GSPN layer against self-attention, linear attention and Mamba as resolution grows"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Defaults: (normal, --quick). None means "depends on the device" (resolved in _settings).
_DEFAULTS = {
    "channels": (96, 32),
    "heads": (3, 2),
    "batch": (1, 1),
    "min_resolution": (64, 32),
    "max_resolution": (None, 256),
    "budget_seconds": (10.0, 2.0),
    "repeats": (5, 3),
}


#: Settings whose command-line option has another name (``gspn bench --dim``, ``--batch-size``).
_OPTION = {"channels": "dim", "batch": "batch_size"}
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


def _settings(args: Any) -> dict:
    """Resolve defaults that depend on ``--quick`` and on the device; explicit options always win."""
    s = {key: getattr(args, _OPTION.get(key, key), None) for key in _DEFAULTS}
    for key, (normal, quick) in _DEFAULTS.items():
        if s[key] is None:
            s[key] = quick if args.quick else normal
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    s["device"] = device
    precision = getattr(args, "precision", None)
    s["dtype"] = _PRECISION_DTYPE[precision] if precision else ("bfloat16" if device == "cuda" else "float32")
    if s["max_resolution"] is None:
        s["max_resolution"] = 16384 if device == "cuda" else 1024
    for key in ("channels", "heads", "batch", "repeats", "budget_seconds"):
        if s[key] <= 0:
            flag = _OPTION.get(key, key).replace("_", "-")
            raise ValueError(f"--{flag} must be positive, got {s[key]}")
    if s["channels"] % s["heads"]:
        raise ValueError(f"--dim {s['channels']} is not divisible by --heads {s['heads']}")
    if args.local_chunk <= 0 or args.d_state <= 0:
        raise ValueError("--local-chunk and --d-state must be positive")
    s["resolutions"] = args.resolutions or resolutions_up_to(s["min_resolution"], s["max_resolution"])
    return s


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(args: Any) -> int:
    """Run the benchmark of the parsed ``gspn bench`` options (:mod:`gspn.commands.bench`); returns the exit code."""
    if args.replot is not None:
        return _replot(args)
    try:
        s = _settings(args)
    except ValueError as exc:
        print(f"gspn bench: {exc}")
        return 2
    if s["device"] == "cuda" and not torch.cuda.is_available():
        print("gspn bench: --device cuda requested but CUDA is not available")
        return 2
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, s)
    finally:
        torch.set_num_threads(threads)


def _run(args: Any, s: dict) -> int:
    device = torch.device(s["device"])
    config = BenchConfig(
        device=device,
        dtype=_DTYPES[s["dtype"]],
        channels=s["channels"],
        heads=s["heads"],
        batch=s["batch"],
        d_state=args.d_state,
        local_chunk=args.local_chunk,
        backward=args.backward,
        gspn_backend=args.gspn_backend,
    )
    methods = list(iter_methods(args.methods))
    mode = "forward+backward" if args.backward else "forward"
    head = (
        f"{_device_name(device)} ({s['device']}, {torch.get_num_threads()} threads), {s['dtype']}, "
        f"B={s['batch']} C={s['channels']} heads={s['heads']}, {mode}"
    )
    scan_backend = _scan_backend(args.gspn_backend, device)
    print(f"gspn bench: {head}")
    print(f"  GSPN scan backend: {scan_backend}; GSPN local chunk {args.local_chunk}, d_state {args.d_state}")
    load = _load_average()
    threads = torch.get_num_threads()
    if device.type == "cpu" and load is not None and threads > 1 and load > (os.cpu_count() or 1):
        print(
            f"  warning: load average {load:.1f} on {os.cpu_count()} CPUs: with {threads} threads a "
            "parallel region can wait for a descheduled thread and times become erratic; "
            "consider --threads 1"
        )
    print(
        f"  sides {', '.join(map(str, s['resolutions']))}; budget {s['budget_seconds']:g} s per "
        f"configuration; median of up to {s['repeats']} calls after 1 warm-up"
    )
    limit = None if args.memory_limit_gb is None else int(args.memory_limit_gb * 2**30)
    results = benchmark(
        config,
        methods,
        s["resolutions"],
        budget_s=s["budget_seconds"],
        repeats=s["repeats"],
        memory_limit_bytes=limit,
        measure_memory=not args.no_memory,
        log=None if args.quiet else print,
    )
    payload = {
        "gspn_version": _gspn_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "title": head,
        "environment": {
            "device": s["device"],
            "device_name": _device_name(device),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_average_1min": load,
        },
        "settings": {
            **s,
            "backward": args.backward,
            "d_state": args.d_state,
            "local_chunk": args.local_chunk,
            "gspn_backend": args.gspn_backend,
            "gspn_backend_resolved": scan_backend,
            "methods": [m.name for m in methods],
            "no_memory": args.no_memory,
        },
        "timed": {m.name: m.label for m in methods},
        "results": [r.to_dict() for r in results],
    }
    return _report(payload, results, args)


def _replot(args: Any) -> int:
    """Re-render tables, fits, ratios and the plot of an earlier ``results.json`` into ``--out``."""
    payload = json.loads(Path(args.replot).read_text())
    fields = set(Result.__dataclass_fields__)
    results = [Result(**{k: v for k, v in r.items() if k in fields}) for r in payload["results"]]
    payload.setdefault("title", f"{payload.get('environment', {}).get('device_name', '')}")
    print(f"gspn bench: re-reporting {args.replot} ({payload['title']})")
    return _report(payload, results, args)


def _report(payload: dict, results: list[Result], args: Any) -> int:
    """Print the tables and ratios, and write ``results.json``, ``table.md`` and ``scaling.png``."""
    from .plot import plot_results

    head = payload["title"]
    fits = exponents(results, skip_smallest=args.fit_skip)
    pairs = ratios(results)
    measured_memory = not payload["settings"].get("no_memory", False)
    print(f"\ntime per call, ms (median) — {head}")
    print(format_table(results, "time", fits=fits))
    if measured_memory:
        cuda = payload["settings"].get("device") == "cuda"
        mem = "cuda.max_memory_allocated" if cuda else "torch.profiler tracked allocations"
        print(
            f"\npeak extra memory during one call, MiB ({mem}; excludes parameters and input; "
            "~ = analytic estimate, not measured)"
        )
        print(format_table(results, "memory"))
    if pairs:
        print("\ntime ratio at the largest resolution both ran:")
        for p in pairs:
            print(
                f"  {p['method']:<20} / {p['gspn']:<11} at {p['resolution']}²: {p['ratio']:8.2f}x "
                f"({p['method_ms']:.2f} ms vs {p['gspn_ms']:.2f} ms)"
            )

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "fit_skip": args.fit_skip, "exponents": fits, "ratios": pairs}
    json_path = write_json(out / "results.json", payload)
    md_path = out / "table.md"
    time_md = format_table(results, "time", markdown=True, fits=fits)
    memory_md = format_table(results, "memory", markdown=True)
    md_path.write_text(
        f"{head}\n\ntime per call, ms (median)\n\n{time_md}\n\npeak extra memory during one call, MiB\n\n{memory_md}\n"
    )
    written = [json_path, md_path]
    if not args.no_plot:
        png = plot_results(results, out / "scaling.png", fits=fits, title=head)
        if png is not None:
            written.append(png)
    print(f"\nwrote {', '.join(str(p) for p in written)}")
    return 0


def _load_average() -> float | None:
    """1-minute load average of the machine (``None`` where the OS does not report one)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _scan_backend(name: str, device: torch.device) -> str:
    """Name of the scan backend ``name`` resolves to on ``device`` (or why it does not resolve)."""
    from ..ops.backends import resolve_backend

    try:
        module = resolve_backend(name, device)
    except RuntimeError as exc:
        return f"unavailable ({exc})"
    resolved = module.__name__.rsplit(".", 1)[-1]
    if resolved == "reference":
        resolved += " (slow pure-PyTorch fallback)"
    return resolved


def _gspn_version() -> str:
    from .. import __version__

    return __version__
