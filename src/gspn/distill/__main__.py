"""``python -m gspn.distill``: deprecated spelling of ``gspn distill``."""

import sys

from ..commands import main

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
