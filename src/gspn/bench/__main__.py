"""``python -m gspn.bench``: the ``gspn bench`` command without the ``gspn`` console script."""

import sys

from ..commands.bench import main

sys.exit(main())
