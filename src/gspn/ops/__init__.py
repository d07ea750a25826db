"""The GSPN operator: reference, CPU and Triton backends behind one autograd-aware API.

* :func:`line_scan` — one scan direction.
* :func:`line_scan_4d` — the four directions ``("tb", "bt", "lr", "rl")`` over one input.
* :func:`stabilize` — the stability–context gate normalisation.
"""

from .backends import available_backends
from .directions import DIRECTIONS
from .line_scan import line_scan, line_scan_4d, scan_flops
from .stabilize import stabilize

__all__ = ["DIRECTIONS", "available_backends", "line_scan", "line_scan_4d", "scan_flops", "stabilize"]
