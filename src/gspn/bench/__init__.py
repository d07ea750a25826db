"""``gspn bench``: time one GSPN layer against attention, linear attention and Mamba as resolution grows.

Reproduces the shape of the GSPN paper's speed figure on the user's own hardware: for square inputs
of growing resolution it times one token-mixing layer of each method (see :mod:`gspn.bench.methods`
for exactly what is timed), skips configurations that would not fit in memory or in the time budget
(:mod:`gspn.bench.runner`), fits each method's scaling exponent in pixels, prints a table and the
attention/GSPN time ratio, and writes ``results.json``, ``table.md`` and ``scaling.png``.

Use it as ``python -m gspn.bench [options]`` or, once registered, ``gspn bench [options]``;
``--quick`` finishes in well under a minute on a laptop CPU.

Registering it in an argparse CLI takes :func:`add_arguments` (which also sets ``func=run`` as the
parser default) and :func:`run`::

    from gspn import bench
    bench.add_arguments(subparsers.add_parser("bench", help=bench.HELP, description=bench.HELP))
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path

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
    "add_arguments",
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


def _csv_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _csv_methods(text: str) -> list[str]:
    names = [v for v in text.replace(",", " ").split() if v]
    valid = {m.name for m in METHODS} | {"all"}
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad}; choose from {', '.join(sorted(valid))}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``gspn bench`` options to ``parser`` and set ``func=run`` as its default."""
    g = parser.add_argument_group("what to run")
    g.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="device (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=tuple(_DTYPES), default=None,
                   help="dtype of layers and inputs (default: float32 on cpu, bfloat16 on cuda)")
    g.add_argument("--channels", type=int, default=None, help="layer width C (default 96; --quick 32)")
    g.add_argument("--heads", type=int, default=None,
                   help="attention heads (default 3, i.e. head dim 32 as in Swin-T stage 1; --quick 2)")
    g.add_argument("--batch", type=int, default=None, help="batch size (default 1)")
    g.add_argument("--d-state", type=int, default=8, help="GSPN proxy dimension (default 8)")
    g.add_argument("--local-chunk", type=int, default=2, help="chunk size of local GSPN (default 2)")
    g.add_argument("--gspn-backend", default="auto", help="GSPN scan backend: auto, cpu, triton, reference")
    g.add_argument("--methods", type=_csv_methods, default=None,
                   help=f"comma-separated list from: {', '.join(m.name for m in METHODS)}, or 'all' "
                   f"(default: {', '.join(DEFAULT_METHODS)})")
    g.add_argument("--backward", action="store_true", help="time forward+backward instead of forward only")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")

    g = parser.add_argument_group("sizes and budget")
    g.add_argument("--max-resolution", type=int, default=None,
                   help="largest side (default 1024 on cpu, 16384 on cuda; --quick 256)")
    g.add_argument("--min-resolution", type=int, default=None, help="smallest side (default 64; --quick 32)")
    g.add_argument("--resolutions", type=_csv_ints, default=None,
                   help="explicit comma-separated sides, e.g. 64,128,256 (overrides min/max)")
    g.add_argument("--budget-seconds", type=float, default=None,
                   help="time budget per configuration, warm-up included (default 10; --quick 2)")
    g.add_argument("--repeats", type=int, default=None,
                   help="timed calls after the warm-up (default 5; --quick 3)")
    g.add_argument("--memory-limit-gb", type=float, default=None,
                   help="skip configurations estimated above this (default: 80%% of available memory)")
    g.add_argument("--fit-skip", type=int, default=1,
                   help="smallest measured sizes left out of the exponent fits (default 1)")
    g.add_argument("--no-memory", action="store_true",
                   help="do not measure peak memory (on CPU this saves one profiled call)")
    g.add_argument("--quick", action="store_true",
                   help="small and fast: C=32, sides 32..256, 2 s budget, 3 repeats (< 1 minute on a CPU)")

    g = parser.add_argument_group("output")
    g.add_argument("--out", type=Path, default=Path("bench_out"),
                   help="directory for results.json, table.md and scaling.png (default ./bench_out)")
    g.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    g.add_argument("--replot", type=Path, default=None, metavar="RESULTS_JSON",
                   help="measure nothing: re-render the tables, fits and plot of an earlier results.json")
    g.add_argument("--quiet", action="store_true", help="no per-configuration progress lines")
    parser.set_defaults(func=run)


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


def _settings(args: argparse.Namespace) -> dict:
    """Resolve defaults that depend on ``--quick`` and on the device; explicit options always win."""
    s = {key: getattr(args, key, None) for key in _DEFAULTS}
    for key, (normal, quick) in _DEFAULTS.items():
        if s[key] is None:
            s[key] = quick if args.quick else normal
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    s["device"] = device
    s["dtype"] = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    if s["max_resolution"] is None:
        s["max_resolution"] = 16384 if device == "cuda" else 1024
    for key in ("channels", "heads", "batch", "repeats", "budget_seconds"):
        if s[key] <= 0:
            raise ValueError(f"--{key.replace('_', '-')} must be positive, got {s[key]}")
    if s["channels"] % s["heads"]:
        raise ValueError(f"--channels {s['channels']} is not divisible by --heads {s['heads']}")
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


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` (from :func:`add_arguments`); returns the exit code."""
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


def _run(args: argparse.Namespace, s: dict) -> int:
    device = torch.device(s["device"])
    config = BenchConfig(
        device=device, dtype=_DTYPES[s["dtype"]], channels=s["channels"], heads=s["heads"], batch=s["batch"],
        d_state=args.d_state, local_chunk=args.local_chunk, backward=args.backward,
        gspn_backend=args.gspn_backend,
    )
    methods = list(iter_methods(args.methods))
    mode = "forward+backward" if args.backward else "forward"
    head = (f"{_device_name(device)} ({s['device']}, {torch.get_num_threads()} threads), {s['dtype']}, "
            f"B={s['batch']} C={s['channels']} heads={s['heads']}, {mode}")
    scan_backend = _scan_backend(args.gspn_backend, device)
    print(f"gspn bench: {head}")
    print(f"  GSPN scan backend: {scan_backend}; GSPN local chunk {args.local_chunk}, d_state {args.d_state}")
    load = _load_average()
    threads = torch.get_num_threads()
    if device.type == "cpu" and load is not None and threads > 1 and load > (os.cpu_count() or 1):
        print(f"  warning: load average {load:.1f} on {os.cpu_count()} CPUs: with {threads} threads a "
              "parallel region can wait for a descheduled thread and times become erratic; "
              "consider --threads 1")
    print(f"  sides {', '.join(map(str, s['resolutions']))}; budget {s['budget_seconds']:g} s per "
          f"configuration; median of up to {s['repeats']} calls after 1 warm-up")
    limit = None if args.memory_limit_gb is None else int(args.memory_limit_gb * 2**30)
    results = benchmark(
        config, methods, s["resolutions"], budget_s=s["budget_seconds"], repeats=s["repeats"],
        memory_limit_bytes=limit, measure_memory=not args.no_memory, log=None if args.quiet else print,
    )
    payload = {
        "gspn_version": _gspn_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "title": head,
        "environment": {
            "device": s["device"], "device_name": _device_name(device), "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "load_average_1min": load,
        },
        "settings": {**s, "backward": args.backward, "d_state": args.d_state, "local_chunk": args.local_chunk,
                     "gspn_backend": args.gspn_backend, "gspn_backend_resolved": scan_backend,
                     "methods": [m.name for m in methods], "no_memory": args.no_memory},
        "timed": {m.name: m.label for m in methods},
        "results": [r.to_dict() for r in results],
    }
    return _report(payload, results, args)


def _replot(args: argparse.Namespace) -> int:
    """Re-render tables, fits, ratios and the plot of an earlier ``results.json`` into ``--out``."""
    payload = json.loads(Path(args.replot).read_text())
    fields = set(Result.__dataclass_fields__)
    results = [Result(**{k: v for k, v in r.items() if k in fields}) for r in payload["results"]]
    payload.setdefault("title", f"{payload.get('environment', {}).get('device_name', '')}")
    print(f"gspn bench: re-reporting {args.replot} ({payload['title']})")
    return _report(payload, results, args)


def _report(payload: dict, results: list[Result], args: argparse.Namespace) -> int:
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
        print(f"\npeak extra memory during one call, MiB ({mem}; excludes parameters and input; "
              "~ = analytic estimate, not measured)")
        print(format_table(results, "memory"))
    if pairs:
        print("\ntime ratio at the largest resolution both ran:")
        for p in pairs:
            print(f"  {p['method']:<20} / {p['gspn']:<11} at {p['resolution']}²: {p['ratio']:8.2f}x "
                  f"({p['method_ms']:.2f} ms vs {p['gspn_ms']:.2f} ms)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "fit_skip": args.fit_skip, "exponents": fits, "ratios": pairs}
    json_path = write_json(out / "results.json", payload)
    md_path = out / "table.md"
    time_md = format_table(results, "time", markdown=True, fits=fits)
    memory_md = format_table(results, "memory", markdown=True)
    md_path.write_text(f"{head}\n\ntime per call, ms (median)\n\n{time_md}\n\n"
                       f"peak extra memory during one call, MiB\n\n{memory_md}\n")
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m gspn.bench``."""
    parser = argparse.ArgumentParser(prog="python -m gspn.bench", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))
