"""Parameter and MAC counts in the GSPN papers' convention.

``MACs = (FLOPs of convolutions, linears and other matmuls, as counted by
torch.utils.flop_counter) / 2 + gspn op cost``, where the scan cost of each direction over a
``(B, C, H, W)`` input is ``B·C·(L − 1)·(7P − 4)`` for ``L`` lines of ``P`` pixels (the formula
registered for ``torch.ops.gspn.line_scan*`` by :mod:`gspn.ops`; FlopCounterMode reports it
per op, and it is already a MAC-style count, so it is not halved). The fused layer
``gspn::gspn_mix`` reports its 1×1 generation and merge MACs plus its scans in the same MAC
convention (:func:`gspn.ops.mix_flops`), so a model's total is the same fused or not. Normalisations, activations
and elementwise products are not counted, as in the papers.

Run ``gspn flops`` for a table of all registered models (built on the meta
device: no memory, a few seconds).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["complexity", "count_params"]

_SCAN_NAMESPACE = "gspn"


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _op_name(op: Any) -> str:
    return getattr(op, "_qualified_op_name", str(op)).replace("::", ".")


def complexity(model: nn.Module, input_size: Sequence[int] = (3, 224, 224), batch: int = 1) -> dict[str, Any]:
    """Parameters and MACs of one forward pass of ``model`` on a ``(batch, *input_size)`` input.

    The model may live on the meta device (then nothing is computed, only shapes). It is run in
    eval mode under ``torch.no_grad`` and its training flag is restored afterwards.

    Returns:
        ``{"params", "macs", "gmacs", "conv_linear_macs", "scan_macs", "flops_by_op"}``, where
        ``macs = conv_linear_macs + scan_macs`` (``scan_macs``: every ``gspn::`` op, i.e. the scans and,
        for fused layers, their parameter generation and merge) and ``flops_by_op`` is FlopCounterMode's raw
        per-op count (``"aten.convolution"``, ``"aten.mm"``, ``"gspn.line_scan_4d"``, ...).
    """
    try:
        ref = next(model.parameters())
        device, dtype = ref.device, ref.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.get_default_dtype()
    x = torch.zeros(batch, *input_size, device=device, dtype=dtype)
    was_training = model.training
    # nn.MultiheadAttention / nn.TransformerEncoderLayer would otherwise take their fused inference
    # fast path in eval mode, whose single op FlopCounterMode does not count.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        # SDPA's math backend decomposes into counted matmuls; the CPU flash kernel has no flop formula.
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
        torch.backends.mha.set_fastpath_enabled(fastpath)
    by_op = {_op_name(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    scan = sum(n for name, n in by_op.items() if name.split(".")[0] == _SCAN_NAMESPACE)
    dense = sum(n for name, n in by_op.items() if name.split(".")[0] != _SCAN_NAMESPACE) // 2
    return {
        "params": count_params(model),
        "macs": dense + scan,
        "gmacs": (dense + scan) / 1e9,
        "conv_linear_macs": dense,
        "scan_macs": scan,
        "flops_by_op": by_op,
    }
