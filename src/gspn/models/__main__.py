"""``python -m gspn.models [names] [--image-size H [W]]``: parameter and MAC table of the registered models."""

from ..commands.classify import models_table

models_table()
