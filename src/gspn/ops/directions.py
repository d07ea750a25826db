"""The four scan directions and the tile (chunk) layout: the one place that defines them.

A scan works on *lines*. For a ``(..., H, W)`` image:

========== =============== ================== ===================
direction  lines are       scan order         "previous" line
========== =============== ================== ===================
``"tb"``   rows            top → bottom       row ``r - 1``
``"bt"``   rows            bottom → top       row ``r + 1``
``"lr"``   columns         left → right       column ``c - 1``
``"rl"``   columns         right → left       column ``c + 1``
========== =============== ================== ===================

The *line frame* of a direction is the image re-indexed as ``(..., L, P)``: line ``l`` is the
``l``-th line in scan order, and position ``p`` runs along the axis perpendicular to the scan in
increasing image index, so the "left" neighbour is ``p - 1`` and the "right" one ``p + 1``.
``to_line_frame`` / ``from_line_frame`` convert between the two frames (the reference backend
uses them; the fast backends index the image in place instead).

Local GSPN (``chunk_size=k``) cuts the scan axis into image-aligned tiles ``[j*k, (j+1)*k)``; the
state is reset to zero wherever a scan enters a tile: at image index ``i`` with ``i % k == 0``
for forward scans, and at ``i == n - 1`` or ``(i + 1) % k == 0`` for reversed scans.

A gate is *used* where its neighbour exists (:func:`used_gate_masks`): not on a line that starts a
tile (no previous line), and for ``w_left`` / ``w_right`` not at the first / last position of the
line. Unused gates never influence a result or a gradient, whatever their value (NaN and ±Inf
included), and their own gradient is exactly 0, on every backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DIRECTIONS: tuple[str, ...] = ("tb", "bt", "lr", "rl")
"""Direction order used everywhere, including the direction axis of :func:`line_scan_4d`."""


@dataclass(frozen=True)
class Direction:
    """Geometry of one scan direction.

    Attributes:
        name: one of :data:`DIRECTIONS`.
        index: position in :data:`DIRECTIONS` (the C and Triton kernels take this integer).
        vertical: ``True`` when lines are rows (the scan axis is H, dim -2).
        reverse: ``True`` when the scan runs towards decreasing image index.
    """

    name: str
    index: int
    vertical: bool
    reverse: bool

    @property
    def scan_dim(self) -> int:
        """Tensor dim (negative) along which the lines follow each other."""
        return -2 if self.vertical else -1

    @property
    def line_dim(self) -> int:
        """Tensor dim (negative) along which one line extends (the perpendicular axis)."""
        return -1 if self.vertical else -2


_BY_NAME = {
    name: Direction(name, index, vertical=name in ("tb", "bt"), reverse=name in ("bt", "rl"))
    for index, name in enumerate(DIRECTIONS)
}


def get_direction(direction: str, *, argname: str = "direction") -> Direction:
    """Return the :class:`Direction` for ``direction``, or raise a ``ValueError`` naming the argument."""
    if not isinstance(direction, str):
        raise TypeError(f"{argname} must be one of {DIRECTIONS}, got {type(direction).__name__}")
    try:
        return _BY_NAME[direction]
    except KeyError:
        raise ValueError(f"{argname} must be one of {DIRECTIONS}, got {direction!r}") from None


def to_line_frame(t: torch.Tensor, direction: str) -> torch.Tensor:
    """``(..., H, W)`` image frame → ``(..., L, P)`` line frame of ``direction`` (see module doc)."""
    d = get_direction(direction)
    if not d.vertical:
        t = t.transpose(-1, -2)
    return t.flip(-2) if d.reverse else t


def from_line_frame(t: torch.Tensor, direction: str) -> torch.Tensor:
    """Inverse of :func:`to_line_frame`: ``(..., L, P)`` → ``(..., H, W)``."""
    d = get_direction(direction)
    if d.reverse:
        t = t.flip(-2)
    return t if d.vertical else t.transpose(-1, -2)


def tile_starts(num_lines: int, chunk_size: int | None, reverse: bool) -> list[bool]:
    """For each line in *scan order*, whether the scan enters a new tile there (state reset).

    Line 0 always starts a tile. ``chunk_size=None`` (global GSPN) gives one tile.

    >>> tile_starts(5, 2, reverse=False)
    [True, False, True, False, True]
    >>> tile_starts(5, 2, reverse=True)   # image tiles [0,2) [2,4) [4,5), entered from the bottom
    [True, True, False, True, False]
    """
    starts = []
    for line in range(num_lines):
        if chunk_size is None:
            starts.append(line == 0)
        elif reverse:
            i = num_lines - 1 - line
            starts.append(i == num_lines - 1 or (i + 1) % chunk_size == 0)
        else:
            starts.append(line % chunk_size == 0)
    return starts


def used_gate_masks(
    height: int, width: int, direction: str, chunk_size: int | None, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the scan of an ``(H, W)`` image uses each gate: boolean ``(H, W)`` masks (image frame)
    of ``w_left``, ``w_mid`` and ``w_right``.

    A gate is unused on a line that starts a tile (there is no previous line to weight), and
    ``w_left`` / ``w_right`` are unused at the first / last position of a line (no such neighbour).

    >>> [m.int().tolist() for m in used_gate_masks(2, 3, "tb", None)]
    [[[0, 0, 0], [0, 1, 1]], [[0, 0, 0], [1, 1, 1]], [[0, 0, 0], [1, 1, 0]]]
    """
    d = get_direction(direction)
    num_lines, length = (height, width) if d.vertical else (width, height)
    line_used = torch.tensor([not s for s in tile_starts(num_lines, chunk_size, d.reverse)], device=device)
    if d.reverse:  # scan order -> image order
        line_used = line_used.flip(0)
    pos = torch.arange(length, device=device)
    mid = line_used[:, None] & (pos >= 0)[None, :]  # (L, P) in image order
    left = mid & (pos > 0)[None, :]
    right = mid & (pos < length - 1)[None, :]
    masks = (left, mid, right)
    return masks if d.vertical else tuple(m.t() for m in masks)  # type: ignore[return-value]
