"""The GSPN operator: reference, CPU and Triton backends behind one autograd-aware API.

* :func:`line_scan` — one scan direction.
* :func:`line_scan_4d` — the four directions ``("tb", "bt", "lr", "rl")`` over one input.
* :func:`stabilize` — the stability–context gate normalisation.
* :func:`gspn_mix` — the fused GSPN layer: parameter generation, four scans, gating and merge.
"""

from .backends import available_backends
from .directions import DIRECTIONS
from .gspn_mix import gspn_mix, mix_flops
from .line_scan import line_scan, line_scan_4d, scan_flops
from .stabilize import stabilize

__all__ = [
    "DIRECTIONS",
    "available_backends",
    "gspn_mix",
    "line_scan",
    "line_scan_4d",
    "mix_flops",
    "scan_flops",
    "stabilize",
]
