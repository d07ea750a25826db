"""Reference backend of the fused layer: the composition of the existing ops, in plain PyTorch.

1×1 generation as ``einsum``, :func:`gspn.ops.line_scan_4d` with its reference backend, gating and
merge: the readable specification, and an explicit chain-rule backward through
``gspn::line_scan_4d_backward``. It materialises the ``(B, 4, C, H, W)`` parameter maps.
"""

from __future__ import annotations

import torch

from ..directions import DIRECTIONS

__all__ = ["NATIVE_DTYPES", "backward", "forward", "generate", "is_available", "unavailable_reason"]

NATIVE_DTYPES = False
"""Inputs arrive in the float32/float64 compute dtype."""

_NUM_DIRECTIONS = len(DIRECTIONS)
_SCAN_BACKEND = "reference"


def is_available(device: torch.device) -> bool:
    """The reference backend runs on any device."""
    return True


def unavailable_reason(device: torch.device) -> str:
    """Always ``""``: the reference backend runs on any device."""
    return ""


def generate(proxy, gate_weight, lam_weight, u_weight, skip_weight):
    """Per-pixel parameters from the proxy: gate logits (B, 4, 3, Cg, H, W) and λ, u, D (B, 4, C, H, W)."""
    gates = torch.einsum("kgcs,bshw->bkgchw", gate_weight, proxy)
    lam, u, skip = (torch.einsum("kcs,bshw->bkchw", w, proxy) for w in (lam_weight, u_weight, skip_weight))
    return gates, lam, u, skip


def _compose_forward(x, proxy, gate_weight, lam_weight, u_weight, skip_weight, merge_weight, chunk_size, scan):
    gates, lam, u, skip = generate(proxy, gate_weight, lam_weight, u_weight, skip_weight)
    h = torch.ops.gspn.line_scan_4d(x, lam, gates[:, :, 0], gates[:, :, 1], gates[:, :, 2], chunk_size, True, scan)
    return torch.einsum("k,bkchw->bchw", merge_weight, u * h + skip * x.unsqueeze(1))


def _compose_backward(grad, x, proxy, gate_weight, lam_weight, u_weight, skip_weight, merge_weight, chunk_size, scan):
    """Chain rule through the composition, with the adjoint scan ``gspn::line_scan_4d_backward``."""
    gates, lam, u, skip = generate(proxy, gate_weight, lam_weight, u_weight, skip_weight)
    wl, wm, wr = gates[:, :, 0], gates[:, :, 1], gates[:, :, 2]
    h = torch.ops.gspn.line_scan_4d(x, lam, wl, wm, wr, chunk_size, True, scan)
    m = merge_weight.view(1, _NUM_DIRECTIONS, 1, 1, 1)
    g = grad.unsqueeze(1)  # (B, 1, C, H, W)
    xk = x.unsqueeze(1)
    d_merge = torch.einsum("bkchw->k", g * (u * h + skip * xk))
    dh, du, dskip = m * g * u, m * g * h, m * g * xk
    dx_scan, dlam, dwl, dwm, dwr = torch.ops.gspn.line_scan_4d_backward(
        dh, h, x, lam, wl, wm, wr, chunk_size, True, scan
    )
    dx = dx_scan + (m * skip * g).sum(1)
    dgates = torch.stack([dwl, dwm, dwr], dim=2)  # (B, 4, 3, Cg, H, W)
    d_gate_weight = torch.einsum("bkgchw,bshw->kgcs", dgates, proxy)
    d_lam_weight, d_u_weight, d_skip_weight = (torch.einsum("bkchw,bshw->kcs", d, proxy) for d in (dlam, du, dskip))
    dproxy = (
        torch.einsum("kgcs,bkgchw->bshw", gate_weight, dgates)
        + torch.einsum("kcs,bkchw->bshw", lam_weight, dlam)
        + torch.einsum("kcs,bkchw->bshw", u_weight, du)
        + torch.einsum("kcs,bkchw->bshw", skip_weight, dskip)
    )
    return [dx, dproxy, d_gate_weight, d_lam_weight, d_u_weight, d_skip_weight, d_merge]


def forward(x, proxy, weights, chunk_size) -> torch.Tensor:
    """``y`` of the composition (any layout; the operator lays it out)."""
    return _compose_forward(x, proxy, *weights, chunk_size, _SCAN_BACKEND)


def backward(grad, x, proxy, weights, chunk_size) -> list[torch.Tensor]:
    """The seven gradients of the composition, by the chain rule."""
    return _compose_backward(grad, x, proxy, *weights, chunk_size, _SCAN_BACKEND)
