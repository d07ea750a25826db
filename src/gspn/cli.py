"""The ``gspn`` command line.

This branch registers the diffusion subcommands only:

* ``gspn distill``: distil a GSPN-swapped diffusion UNet (:mod:`gspn.distill`);
* ``gspn generate``: high-resolution text-to-image (:mod:`gspn.integrations.generate`).

Each subcommand is also runnable on its own (``python -m gspn.distill``,
``python -m gspn.integrations.generate``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``gspn`` parser with its subcommands."""
    from .distill.command import add_distill_arguments, run_distill
    from .integrations.generate import add_generate_arguments, run_generate

    parser = argparse.ArgumentParser(prog="gspn", description="Generalized Spatial Propagation Networks.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("distill", help="distil a GSPN-swapped diffusion UNet from the original",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_distill_arguments(p)
    p.set_defaults(func=run_distill)
    p = sub.add_parser("generate", help="high-resolution text-to-image with a GSPN adapter",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_generate_arguments(p)
    p.set_defaults(func=run_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gspn`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
