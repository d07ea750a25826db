"""A float64 oracle of the line scan, written directly from the equations in image coordinates.

Deliberately independent of ``gspn.ops`` (no line frames, no shifts, no shared helpers): one loop
over pixels per direction, vectorised only over batch and channels, differentiable by autograd.
"""

from __future__ import annotations

import torch


def expand_param(p: torch.Tensor, shape) -> torch.Tensor:
    """Broadcast a parameter to ``shape`` (B, C, H, W): batch 1 → B, channel groups → C."""
    batch, channels = shape[:2]
    if p.shape[1] != channels:
        p = p.repeat_interleave(channels // p.shape[1], dim=1)
    return p.expand(batch, *p.shape[1:])


def _sigmoid(a):
    return 1.0 / (1.0 + torch.exp(-a))


def oracle_line_scan(x, lam, w_left, w_mid, w_right, direction="tb", chunk_size=None, normalize=False):
    x = x.double()
    lam, wl, wm, wr = (expand_param(p.double(), x.shape) for p in (lam, w_left, w_mid, w_right))
    _, _, height, width = x.shape
    vertical = direction in ("tb", "bt")
    n = height if vertical else width

    def weights(r, c):
        gl, gm, gr = wl[..., r, c], wm[..., r, c], wr[..., r, c]
        if not normalize:
            return gl, gm, gr
        pos, size = (c, width) if vertical else (r, height)
        sl = _sigmoid(gl) if pos > 0 else torch.zeros_like(gl)
        sm = _sigmoid(gm)
        sr = _sigmoid(gr) if pos < size - 1 else torch.zeros_like(gr)
        total = sl + sm + sr
        return sl / total, sm / total, sr / total

    def starts(i):  # i: image index along the scan axis
        if direction in ("tb", "lr"):
            return i == 0 or (chunk_size is not None and i % chunk_size == 0)
        return i == n - 1 or (chunk_size is not None and (i + 1) % chunk_size == 0)

    h = {}

    def get(r, c):
        if 0 <= r < height and 0 <= c < width:
            return h[r, c]
        return torch.zeros_like(x[..., 0, 0])

    order = range(n) if direction in ("tb", "lr") else range(n - 1, -1, -1)
    step = -1 if direction in ("tb", "lr") else 1  # offset to the previous line
    for i in order:
        for j in range(width if vertical else height):
            r, c = (i, j) if vertical else (j, i)
            value = lam[..., r, c] * x[..., r, c]
            if not starts(i):
                gl, gm, gr = weights(r, c)
                if vertical:
                    pr = r + step
                    value = value + gl * get(pr, c - 1) + gm * get(pr, c) + gr * get(pr, c + 1)
                else:
                    pc = c + step
                    value = value + gl * get(r - 1, pc) + gm * get(r, pc) + gr * get(r + 1, pc)
            h[r, c] = value
    rows = [torch.stack([h[r, c] for c in range(width)], dim=-1) for r in range(height)]
    return torch.stack(rows, dim=-2)


def unused_gates(height, width, direction="tb", chunk_size=None):
    """Boolean ``(3, H, W)`` masks of the gates the recurrence never uses: all three on a line that
    starts a tile (no previous line), ``w_left`` / ``w_right`` where that neighbour is outside the
    image. Written from the equations, like :func:`oracle_line_scan`."""
    vertical = direction in ("tb", "bt")
    n = height if vertical else width

    def starts(i):
        if direction in ("tb", "lr"):
            return i == 0 or (chunk_size is not None and i % chunk_size == 0)
        return i == n - 1 or (chunk_size is not None and (i + 1) % chunk_size == 0)

    mask = torch.zeros(3, height, width, dtype=torch.bool)
    for r in range(height):
        for c in range(width):
            i, j, size = (r, c, width) if vertical else (c, r, height)
            if starts(i):
                mask[:, r, c] = True
            mask[0, r, c] |= j == 0
            mask[2, r, c] |= j == size - 1
    return mask


def oracle_mix(x, proxy, gate_weight, lam_weight, u_weight, skip_weight, merge_weight, chunk_size=None):
    """The issue's equations, written independently: explicit per-direction loops over the pixel oracle."""
    channels = x.shape[1]
    group = channels // gate_weight.shape[2]
    y = torch.zeros_like(x)
    for k, direction in enumerate(("tb", "bt", "lr", "rl")):  # the order of gspn.ops.DIRECTIONS
        gates = [
            torch.einsum("cs,bshw->bchw", gate_weight[k, g], proxy).repeat_interleave(group, dim=1) for g in range(3)
        ]
        lam, u, skip = (torch.einsum("cs,bshw->bchw", w[k], proxy) for w in (lam_weight, u_weight, skip_weight))
        h = oracle_line_scan(x, lam, *gates, direction=direction, chunk_size=chunk_size, normalize=True)
        y = y + merge_weight[k] * (u * h + skip * x)
    return y
