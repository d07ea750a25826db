"""Triton kernels of the line scan, one module per variant (imported lazily: only once ``triton`` is
known to be present). This module re-exports the six kernels; :mod:`.common` holds the helpers the
variants share.

Index conventions (see :mod:`gspn.ops.directions`): a *slice* ``s = b·C + c`` is one ``(b, c)``
image plane, dense row-major ``H × W``. Line ``i`` (image index along the scan axis) and position
``p`` (along the perpendicular axis) live at element offset ``i·LINE_STRIDE + p·POS_STRIDE`` of the
plane: ``(W, 1)`` for the vertical directions (lines are rows) and ``(1, W)`` for the horizontal
ones (lines are columns). Reversed directions walk ``i`` downwards. Nothing is flipped or
transposed in memory.

Each program of the first two families owns ``BLOCK_S`` slices and a set of tiles (chunks) of the
scan axis, and walks the lines of each tile in scan order. Three kernel families (forward and
adjoint each):

* *memory* (:mod:`.memory`: ``line_scan_fwd_kernel``, ``line_scan_bwd_kernel``): a line is processed in blocks of
  ``BLOCK_P`` positions, so lines of any length work; the state of the previous line is exchanged
  through memory (the output itself when it is float32/float64, else a float32 scratch ping-pong
  buffer) with a block-wide barrier between lines;
* *register* (:mod:`.register`: ``*_reg_kernel``): the whole line is one block and the state stays in registers;
* *split* (:mod:`.split`: ``*_split_kernel``): a line is shared by several programs, each holding a window of it
  in registers and recomputing a halo; programs of consecutive time blocks are chained by flags
  (see the comment at the top of :mod:`.split`).

All families share the ``@triton.jit`` helpers of :mod:`.common` and :mod:`gspn.ops._triton.gates`
(inlined by the compiler):
slice and base-offset set-up, line indexing, gate loading and normalisation, and the per-line
gradient math of the adjoint.
"""

from __future__ import annotations

import triton  # noqa: F401  (first: importing this package without triton fails here, whatever is cached)

from .memory import line_scan_bwd_kernel, line_scan_fwd_kernel
from .register import line_scan_bwd_reg_kernel, line_scan_fwd_reg_kernel
from .split import line_scan_bwd_split_kernel, line_scan_fwd_split_kernel

__all__ = [
    "line_scan_bwd_kernel",
    "line_scan_bwd_reg_kernel",
    "line_scan_bwd_split_kernel",
    "line_scan_fwd_kernel",
    "line_scan_fwd_reg_kernel",
    "line_scan_fwd_split_kernel",
]
