"""gspn: Generalized Spatial Propagation Networks for PyTorch.

The core is one operator, :func:`gspn.ops.line_scan`: a 2-D linear recurrence that processes an
image one line at a time, each pixel mixing three neighbours of the previous line.
"""

from . import ops

__version__ = "0.1.0"

__all__ = ["__version__", "ops"]
