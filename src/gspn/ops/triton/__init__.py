"""Triton backend of the line scan: one fused kernel launch per direction, forward and backward.

Selected by ``backend="triton"`` (and by ``"auto"`` for CUDA tensors). With ``TRITON_INTERPRET=1``
set before ``triton`` is first imported it also runs on CPU tensors through the Triton
interpreter, which is how the test suite exercises the kernels without a GPU. ``import gspn``
never needs triton: triton is imported lazily and the backend reports itself unavailable without it.

Design and byte model: see ``README.md`` next to this file. This package only re-exports:

* ``_backend``: the :class:`gspn.ops.backends.ScanBackend` surface (``is_available``,
  ``unavailable_reason``, ``allocate``, ``NATIVE_DTYPES``, ``scan``, ``scan_backward``);
* ``_launch``: the launch policy (``launch_config``, ``launch_overrides``, ``split_programs``) and the
  one fallback chain (``run_variants``: a register or split variant falls back to the memory
  variant only when it cannot be built, ``cannot_build``);
* ``_kernels``: the ``@triton.jit`` kernels (imported on first use).

* Inputs are read in their own dtype (float32, bfloat16, float16, float64), the output is written
  in its dtype, and the state and all arithmetic are float32 (float64 for float64 outputs)
  (``NATIVE_DTYPES = True`` tells :mod:`gspn.ops.line_scan` not to up-cast beforehand).
* All four directions index the ``(H, W)`` plane in place; channel-shared / batch-shared
  parameters are read by index (batch stride 0, parameter channel ``c // (C / Cg)``).
* ``normalize=True`` evaluates the stability–context normalisation inside the kernels (the backward
  recomputes it and returns gradients w.r.t. the logits).
* Local GSPN tiles are independent and are spread over the second grid axis; when the planes are
  too few to fill the GPU (a global scan of ``(1, 8, 16384, 16384)``), each line is shared by
  several programs (the *split* variant).
"""

from __future__ import annotations

from ._backend import NATIVE_DTYPES, allocate, is_available, scan, scan_backward, unavailable_reason
from ._launch import cannot_build, launch_config, launch_overrides, run_variants, split_programs

__all__ = [
    "NATIVE_DTYPES",
    "allocate",
    "cannot_build",
    "is_available",
    "launch_config",
    "launch_overrides",
    "run_variants",
    "scan",
    "scan_backward",
    "split_programs",
    "unavailable_reason",
]
