"""``gspn bench``: time one GSPN layer against attention, linear attention and Mamba (:mod:`gspn.recipes.bench`).

Every flag sets the :class:`~gspn.recipes.bench.BenchConfig` field of the same name.
"""

from __future__ import annotations

import argparse
from typing import Any

from . import _flags as F

__all__ = ["HELP", "add_arguments", "register"]

HELP = "time one GSPN layer against self-attention, linear attention and Mamba as resolution grows"


def register(sub: Any) -> None:
    """Add ``bench`` to the ``gspn`` sub-parsers (no abbreviated flags: ``--out`` is not ``--output-dir``)."""
    F.add_recipe_command(
        sub, "bench", HELP, add_arguments, "recipes.bench", "BenchConfig", formatter_class=argparse.HelpFormatter
    )


def _csv_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _csv_methods(text: str) -> list[str]:
    from ..recipes.bench.config import check_methods
    from ..training_utils import ConfigError

    names = [v for v in text.replace(",", " ").split() if v]
    try:
        check_methods(names)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``gspn bench`` options to ``parser`` and set ``func`` to the command."""
    from ..recipes.bench import DEFAULT_METHODS, METHODS
    from ..training_utils import PRECISIONS

    g = parser.add_argument_group("what to run")
    F.add_device(g, "auto", "auto | cpu | cuda | cuda:N (default auto: cuda if available, else cpu)")
    F.add_precision(g, PRECISIONS, "auto", "dtype of layers and inputs (default auto: fp32 on cpu, bf16 on cuda)")
    g.add_argument("--dim", type=int, default=None, help="layer width C (default 96; --quick 32)")
    g.add_argument(
        "--heads",
        type=int,
        default=None,
        help="attention heads (default 3, i.e. head dim 32 as in Swin-T stage 1; --quick 2)",
    )
    F.add_batch_size(g, None, "batch size (default 1)")
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
    F.add_threads(g)

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
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure peak memory (--no-memory saves one profiled call per configuration on CPU)",
    )
    g.add_argument(
        "--quick",
        action="store_true",
        help="small and fast: C=32, sides 32..256, 2 s budget, 3 repeats (< 1 minute on a CPU)",
    )

    g = parser.add_argument_group("output")
    F.add_output_dir(g, "bench_out", "directory for results.json, table.md and scaling.png (default ./bench_out)")
    g.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write the PNG plot scaling.png")
    g.add_argument(
        "--replot",
        default=None,
        metavar="RESULTS_JSON",
        help="measure nothing: re-render the tables, fits and plot of an earlier results.json",
    )
    g.add_argument("--quiet", action="store_true", help="no per-configuration progress lines")
