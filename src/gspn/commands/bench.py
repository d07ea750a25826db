"""``gspn bench``: time one GSPN layer against attention, linear attention and Mamba (:mod:`gspn.bench`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import _flags as F

__all__ = ["add_arguments", "main", "register"]


def register(sub: Any) -> None:
    """Add ``bench`` to the ``gspn`` sub-parsers."""
    from ..bench import HELP

    add_arguments(sub.add_parser("bench", help=HELP, description=HELP))


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
    from ..bench import METHODS

    valid = {m.name for m in METHODS} | {"all"}
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad}; choose from {', '.join(sorted(valid))}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``gspn bench`` options to ``parser`` and set ``func=run`` as its default."""
    from ..bench import DEFAULT_METHODS, METHODS, run

    g = parser.add_argument_group("what to run")
    g.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="device (default: cuda if available, else cpu)"
    )
    F.add_precision(
        g,
        ("fp32", "bf16", "fp16"),
        None,
        "dtype of layers and inputs (default: fp32 on cpu, bf16 on cuda)",
        aliases=("--dtype",),
    )
    g.add_argument("--dim", type=int, default=None, help="layer width C (default 96; --quick 32)")
    F.add_alias(g, "--channels", "--dim", "dim", type=int)
    g.add_argument(
        "--heads",
        type=int,
        default=None,
        help="attention heads (default 3, i.e. head dim 32 as in Swin-T stage 1; --quick 2)",
    )
    F.add_batch_size(g, None, "batch size (default 1)", aliases=("--batch",))
    g.add_argument("--d-state", type=int, default=8, help="GSPN proxy dimension (default 8)")
    g.add_argument("--local-chunk", type=int, default=2, help="chunk size of local GSPN (default 2)")
    g.add_argument("--gspn-backend", default="auto", help="GSPN scan backend: auto, cpu, triton, reference")
    g.add_argument(
        "--methods",
        type=_csv_methods,
        default=None,
        help=f"comma-separated list from: {', '.join(m.name for m in METHODS)}, or 'all' "
        f"(default: {', '.join(DEFAULT_METHODS)})",
    )
    g.add_argument("--backward", action="store_true", help="time forward+backward instead of forward only")
    F.add_threads(g, None)

    g = parser.add_argument_group("sizes and budget")
    g.add_argument(
        "--max-resolution",
        type=int,
        default=None,
        help="largest side (default 1024 on cpu, 16384 on cuda; --quick 256)",
    )
    g.add_argument("--min-resolution", type=int, default=None, help="smallest side (default 64; --quick 32)")
    g.add_argument(
        "--resolutions",
        type=_csv_ints,
        default=None,
        help="explicit comma-separated sides, e.g. 64,128,256 (overrides min/max)",
    )
    g.add_argument(
        "--budget-seconds",
        type=float,
        default=None,
        help="time budget per configuration, warm-up included (default 10; --quick 2)",
    )
    g.add_argument("--repeats", type=int, default=None, help="timed calls after the warm-up (default 5; --quick 3)")
    g.add_argument(
        "--memory-limit-gb",
        type=float,
        default=None,
        help="skip configurations estimated above this (default: 80%% of available memory)",
    )
    g.add_argument(
        "--fit-skip", type=int, default=1, help="smallest measured sizes left out of the exponent fits (default 1)"
    )
    g.add_argument(
        "--no-memory", action="store_true", help="do not measure peak memory (on CPU this saves one profiled call)"
    )
    g.add_argument(
        "--quick",
        action="store_true",
        help="small and fast: C=32, sides 32..256, 2 s budget, 3 repeats (< 1 minute on a CPU)",
    )

    g = parser.add_argument_group("output")
    F.add_output_dir(
        g,
        Path("bench_out"),
        "directory for results.json, table.md and scaling.png (default ./bench_out)",
        aliases=("--out",),
        type=Path,
    )
    g.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    g.add_argument(
        "--replot",
        type=Path,
        default=None,
        metavar="RESULTS_JSON",
        help="measure nothing: re-render the tables, fits and plot of an earlier results.json",
    )
    g.add_argument("--quiet", action="store_true", help="no per-configuration progress lines")
    parser.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gspn.bench``: the ``bench`` command alone."""
    from ..bench import HELP
    from . import _Parser

    parser = _Parser(prog="python -m gspn.bench", description=HELP)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)
