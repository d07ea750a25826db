"""The GSPN operator: reference, CPU and Triton backends behind one autograd-aware API.

* :func:`line_scan` — one scan direction.
* :func:`line_scan_4d` — the four directions ``("tb", "bt", "lr", "rl")`` over one input.
* :func:`stabilize` — the stability–context gate normalisation.
* :func:`gspn_mix` — the fused GSPN layer: parameter generation, four scans, gating and merge.

One folder per operator (``line_scan/``, ``gspn_mix/``): its public function and ``torch.library``
ops in ``__init__.py``, its backends side by side (``reference.py``, ``cpu.py``, ``triton.py`` and
its kernels), each a registration in :mod:`.backends` (the one registry, keyed by operator and
backend name). Shared by the operators: :mod:`._library` (op definition, dtype and layout rules),
:mod:`._autograd` (every autograd mode), :mod:`.directions`, :mod:`.stabilize`, :mod:`.validation`,
:mod:`._cpu` (building the C++ library from ``csrc/``) and :mod:`._triton` (launch policy and
shared ``@triton.jit`` helpers).
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
