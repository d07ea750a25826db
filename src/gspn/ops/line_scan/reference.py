"""Reference backend: the readable specification of the line scan, in plain PyTorch.

In the line frame of a direction (``(B, C, L, P)``, see :mod:`gspn.ops.directions`) the forward
recurrence over lines ``l`` is

    h[l, p] = lam[l, p] x[l, p] + w_left[l, p] h[l-1, p-1] + w_mid[l, p] h[l-1, p] + w_right[l, p] h[l-1, p+1]

with ``h[l-1] = 0`` where line ``l`` starts a tile and zero outside ``0 <= p < P``. The backward
pass is the adjoint recurrence, run over the lines in reverse: with ``g = dL/dh``,

    a[l, p] = g[l, p] + w_left[l+1, p+1] a[l+1, p+1] + w_mid[l+1, p] a[l+1, p] + w_right[l+1, p-1] a[l+1, p-1]

(the second part absent where line ``l+1`` starts a tile), and then ``dx = lam a``, ``dlam = x a``,
``dw_left[l, p] = a[l, p] h[l-1, p-1]``, ``dw_mid = a h[l-1, p]``, ``dw_right = a h[l-1, p+1]``.

Everything is vectorised over batch, channels and positions; the only Python loop is over lines.

Gates that the recurrence does not use (on a line that starts a tile; ``w_left`` / ``w_right`` at
the first / last position of a line) are replaced by 0 before anything reads them, and their
gradients are set to exactly 0: whatever they hold (NaN, ±Inf) never reaches a result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backends import plain_allocate as allocate
from ..directions import from_line_frame, get_direction, tile_starts, to_line_frame, used_gate_masks
from ..stabilize import stabilize, stabilize_vjp
from ..validation import expand_channels

__all__ = ["NATIVE_DTYPES", "allocate", "is_available", "scan", "scan_backward", "unavailable_reason"]

NATIVE_DTYPES = False
"""Inputs arrive in the float32/float64 accumulation dtype (the caller up-casts float16/bfloat16)."""


def is_available(device: torch.device) -> bool:
    """The reference backend runs on any device."""
    return True


def unavailable_reason(device: torch.device) -> str:
    """Always ``""``: the reference backend runs on any device."""
    return ""


def _from_left(t: torch.Tensor) -> torch.Tensor:
    """``out[..., p] = t[..., p-1]`` (zero at p = 0)."""
    return F.pad(t[..., :-1], (1, 0))


def _from_right(t: torch.Tensor) -> torch.Tensor:
    """``out[..., p] = t[..., p+1]`` (zero at the last p)."""
    return F.pad(t[..., 1:], (0, 1))


def _used_gates(w_left, w_mid, w_right, direction: str, chunk_size: int | None):
    """The gates with their unused entries replaced by 0, and the masks of the used ones."""
    height, width = w_left.shape[-2:]
    masks = used_gate_masks(height, width, direction, chunk_size, w_left.device)
    gates = tuple(torch.where(m, g, 0.0) for m, g in zip(masks, (w_left, w_mid, w_right), strict=True))
    return gates, masks


def _gates(w_left, w_mid, w_right, direction: str, normalize: bool, channels: int):
    """Gate weights as the scan uses them (normalised if ``normalize``)."""
    if not normalize:
        return w_left, w_mid, w_right
    gates = (w_left, w_mid, w_right)
    if len({g.shape for g in gates}) > 1:  # different broadcast layouts: normalise at full size
        batch = max(g.shape[0] for g in gates)
        gates = tuple(expand_channels(g, channels).expand(batch, -1, -1, -1) for g in gates)
    return stabilize(*gates, direction=direction)


def _full_line_frame(t: torch.Tensor, channels: int, direction: str) -> torch.Tensor:
    return to_line_frame(expand_channels(t, channels), direction)


def scan(x, lam, w_left, w_mid, w_right, *, direction: str, chunk_size: int | None, normalize: bool, out):
    """Forward scan of one direction; writes ``h`` (image frame, ``(B, C, H, W)``) into ``out``."""
    channels = x.shape[1]
    (w_left, w_mid, w_right), _ = _used_gates(w_left, w_mid, w_right, direction, chunk_size)
    wl, wm, wr = _gates(w_left, w_mid, w_right, direction, normalize, channels)
    x_, lam_, wl, wm, wr = (_full_line_frame(t, channels, direction) for t in (x, lam, wl, wm, wr))
    starts = tile_starts(x_.shape[-2], chunk_size, get_direction(direction).reverse)
    lines = []
    for l, start in enumerate(starts):
        h = lam_[..., l, :] * x_[..., l, :]
        if not start:
            prev = lines[-1]
            h = h + wl[..., l, :] * _from_left(prev) + wm[..., l, :] * prev + wr[..., l, :] * _from_right(prev)
        lines.append(h)
    out.copy_(from_line_frame(torch.stack(lines, dim=-2), direction))
    return out


def scan_backward(
    grad, h, x, lam, w_left, w_mid, w_right, *, direction, chunk_size, normalize, dx, accumulate_dx, d_params
):
    """Adjoint scan of one direction.

    Writes (or adds, if ``accumulate_dx``) ``dL/dx`` into ``dx`` and the full-size ``(B, C, H, W)``
    gradients of ``lam, w_left, w_mid, w_right`` (w.r.t. the logits if ``normalize``) into
    ``d_params``; reducing them to broadcast shapes is the caller's job.
    """
    channels = x.shape[1]
    (w_left, w_mid, w_right), masks = _used_gates(w_left, w_mid, w_right, direction, chunk_size)
    gates = _gates(w_left, w_mid, w_right, direction, normalize, channels)
    g_, h_, wl, wm, wr = (
        _full_line_frame(t.expand(x.shape[0], *t.shape[1:]), channels, direction) for t in (grad, h, *gates)
    )
    starts = tile_starts(g_.shape[-2], chunk_size, get_direction(direction).reverse)
    num_lines = len(starts)
    adj = [None] * num_lines
    d_wl, d_wm, d_wr = (torch.zeros_like(g_) for _ in range(3))
    for l in reversed(range(num_lines)):
        a = g_[..., l, :]
        if l + 1 < num_lines and not starts[l + 1]:
            nxt = adj[l + 1]
            a = a + _from_right(wl[..., l + 1, :] * nxt) + wm[..., l + 1, :] * nxt + _from_left(wr[..., l + 1, :] * nxt)
        adj[l] = a
        if not starts[l]:
            prev = h_[..., l - 1, :]
            d_wl[..., l, :] = a * _from_left(prev)
            d_wm[..., l, :] = a * prev
            d_wr[..., l, :] = a * _from_right(prev)
    a_img = from_line_frame(torch.stack(adj, dim=-2), direction)
    d_wl, d_wm, d_wr = (from_line_frame(t, direction) for t in (d_wl, d_wm, d_wr))
    lam_full = expand_channels(lam, channels)
    if accumulate_dx:
        dx.add_(lam_full * a_img)
    else:
        torch.mul(lam_full, a_img, out=dx)
    d_lam = x * a_img
    if normalize:
        logits = tuple(expand_channels(t, channels).expand_as(x) for t in (w_left, w_mid, w_right))
        weights = tuple(expand_channels(t, channels).expand_as(x) for t in gates)
        d_wl, d_wm, d_wr = stabilize_vjp(d_wl, d_wm, d_wr, logits, weights)
    d_wl, d_wm, d_wr = (torch.where(m, d, 0.0) for m, d in zip(masks, (d_wl, d_wm, d_wr), strict=True))
    for buffer, value in zip(d_params, (d_lam, d_wl, d_wm, d_wr), strict=True):
        buffer.copy_(value)
