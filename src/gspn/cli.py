"""The ``gspn`` command line (console script ``gspn = "gspn.cli:main"``).

Only ``bench`` is registered on this branch; other subcommands are added beside it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``gspn`` parser with one sub-parser per subcommand, each with ``func`` as its default."""
    from . import bench

    parser = argparse.ArgumentParser(prog="gspn", description="Generalized Spatial Propagation Networks")
    subparsers = parser.add_subparsers(dest="command", required=True)
    bench.add_arguments(subparsers.add_parser("bench", help=bench.HELP, description=bench.HELP))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns its exit code."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
