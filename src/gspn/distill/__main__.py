"""``python -m gspn.distill``: same as ``gspn distill``."""

from .command import main

if __name__ == "__main__":
    raise SystemExit(main())
