"""``python -m gspn`` runs the ``gspn`` command line (the same as the ``gspn`` console script)."""

import sys

from .commands import main

if __name__ == "__main__":
    sys.exit(main())
