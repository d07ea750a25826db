"""``gspn.cli``: the console script's historical module; the command line lives in :mod:`gspn.commands`."""

from __future__ import annotations

import sys

from .commands import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
