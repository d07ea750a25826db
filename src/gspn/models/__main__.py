"""``python -m gspn.models [names] [--img-size H W]``: parameter and MAC table of the registered models."""

from .complexity import main

main()
