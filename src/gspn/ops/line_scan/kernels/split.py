"""Split variants of the line scan: a line shared by several programs, each holding a window of
it in registers and recomputing a halo; programs of consecutive time blocks chained by flags."""

from __future__ import annotations

import triton
import triton.language as tl

from ..._triton.gates import forward_gates, neighbours
from .common import (
    adjoint_bases,
    adjoint_line,
    forward_bases,
    line_inputs,
    line_offsets,
    line_strides,
)

# -------------------------------------------------------------------------------------------------
# Split variants: a line is shared by several programs, so that few planes still fill the GPU
# (``(1, 8, 16384, 16384)`` has 8 planes: the variants above run 8 programs there).
#
# The lines of a plane are cut into segments of SEG positions and the scan axis into time blocks
# of HALO lines. Program (k, g, seg) scans time block k of the slice group g over the window
# ``[seg·SEG - HALO, (seg+1)·SEG + HALO)`` (BLOCK_P = SEG + 2·HALO positions), starting from the
# state that the programs of block k-1 left in a float32 scratch line. A position depends on
# three positions of the line before, so after t lines only ``[seg·SEG - HALO + t, … - t)`` is
# exact: after HALO lines exactly the program's own segment, which is all it writes. The halo is
# recomputed (≈ 2·HALO/SEG extra reads, from L2 when the neighbours run at the same time) instead
# of exchanging edge values every line.
#
# Block k reads what block k-1 wrote: each program publishes a per-program flag (release) once
# its last line is in the scratch, and waits (acquire) for the flags of the three programs of
# block k-1 whose segments its window touches (HALO <= SEG). Programs take their (k, g, seg) from
# an atomic ticket counter in block-major order, so every program they wait for holds a smaller
# ticket and is already running or done: no deadlock, whatever order the hardware starts programs
# in, and under the interpreter (programs run one after another in ticket order) no wait ever
# spins. The scratch holds two lines per slice (block parity): block k+1 overwrites the line that
# block k-1 left only after waiting for the three block-k programs that read it.


@triton.jit
def _split_program(
    sync_ptr,
    S,
    P,
    SEG,
    HALO,
    NUM_SEG,
    NUM_GROUPS,
    BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Ticket, time block ``k``, segment, slices and window of a split program.

    Returns the ticket (its flag is ``sync_ptr + 1 + ticket``), ``k``, ``seg``, the slices ``s``
    (int64), the window's image positions ``p`` (may lie outside ``[0, P)``),
    ``inside`` (``[BLOCK_S, BLOCK_P]``: slice and position exist) and ``own`` (``inside`` and in
    this program's segment).
    """
    ticket = tl.atomic_add(sync_ptr, 1)
    per_block = NUM_GROUPS * NUM_SEG
    k = ticket // per_block
    group = (ticket % per_block) // NUM_SEG
    seg = ticket % NUM_SEG
    s = (group * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    q = tl.arange(0, BLOCK_P)
    p = seg * SEG - HALO + q
    inside = (s < S)[:, None] & ((p >= 0) & (p < P))[None, :]
    own = inside & ((q >= HALO) & (q < HALO + SEG))[None, :]
    return ticket, k, seg, s, p, inside, own


@triton.jit
def _window_neighbours(p, P, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr):
    """Existence of the image neighbours ``p ± 1`` and their gather indices inside the window."""
    q = tl.arange(0, BLOCK_P)
    has_l = tl.broadcast_to((p >= 1)[None, :], [BLOCK_S, BLOCK_P])
    has_r = tl.broadcast_to((p + 1 < P)[None, :], [BLOCK_S, BLOCK_P])
    idx_l = tl.broadcast_to(tl.maximum(q - 1, 0)[None, :], [BLOCK_S, BLOCK_P])
    idx_r = tl.broadcast_to(tl.minimum(q + 1, BLOCK_P - 1)[None, :], [BLOCK_S, BLOCK_P])
    return has_l, has_r, idx_l, idx_r


@triton.jit
def _wait_for_block_before(sync_ptr, ticket, k, seg, NUM_SEG, NUM_GROUPS):
    """Wait until the programs of time block ``k - 1`` that own segments ``seg - 1 … seg + 1`` of
    this slice group have published their last line (nothing to wait for in block 0)."""
    if k > 0:
        flag = sync_ptr + 1 + ticket - NUM_GROUPS * NUM_SEG
        while tl.atomic_add(flag, 0, sem="acquire") == 0:
            pass
        if seg > 0:
            while tl.atomic_add(flag - 1, 0, sem="acquire") == 0:
                pass
        if seg + 1 < NUM_SEG:
            while tl.atomic_add(flag + 1, 0, sem="acquire") == 0:
                pass
    tl.debug_barrier()


@triton.jit
def _publish(sync_ptr, ticket):
    """Make this program's scratch line visible (all threads' stores, then one release flag)."""
    tl.debug_barrier()
    tl.atomic_xchg(sync_ptr + 1 + ticket, 1, sem="release")


@triton.jit
def _starts_tile(j, L, CHUNK, REVERSE: tl.constexpr):
    """Whether scan step ``j`` (scan order) enters a new tile: its state before is zero.

    Tiles are ``[m·CHUNK, (m+1)·CHUNK)`` in image order (see ``gspn.ops.directions.tile_starts``);
    a reversed scan enters each at its last line.
    """
    if REVERSE:
        i = L - 1 - j
        return (i == L - 1) | ((i + 1) % CHUNK == 0)
    return j % CHUNK == 0


@triton.jit
def line_scan_fwd_split_kernel(
    x_ptr,
    lam_ptr,
    wl_ptr,
    wm_ptr,
    wr_ptr,
    out_ptr,
    state_ptr,
    sync_ptr,
    x_sb,
    x_sc,
    lam_sb,
    lam_sc,
    lam_div,
    wl_sb,
    wl_sc,
    wl_div,
    wm_sb,
    wm_sc,
    wm_div,
    wr_sb,
    wr_sc,
    wr_div,
    out_sb,
    out_sc,
    S,
    C,
    W,
    L,
    P,
    CHUNK,
    SEG,
    HALO,
    NUM_SEG,
    NUM_GROUPS,
    VERTICAL: tl.constexpr,
    REVERSE: tl.constexpr,
    NORMALIZE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Forward recurrence over time block ``k`` of one segment (see the section comment).

    Grid: ``(NUM_TIME_BLOCKS · NUM_GROUPS · NUM_SEG,)``; ``sync_ptr``: int32 zeros, one ticket
    counter then one flag per program; ``state_ptr``: float32 ``(S, 2, P)`` scratch.
    """
    ticket, k, seg, s, p, inside, own = _split_program(sync_ptr, S, P, SEG, HALO, NUM_SEG, NUM_GROUPS, BLOCK_S, BLOCK_P)
    b = s // C
    c = s % C
    line_stride, pos_stride = line_strides(W, VERTICAL)
    x_base, lam_base, wl_base, wm_base, wr_base, out_base = forward_bases(
        b,
        c,
        x_sb,
        x_sc,
        lam_sb,
        lam_sc,
        lam_div,
        wl_sb,
        wl_sc,
        wl_div,
        wm_sb,
        wm_sc,
        wm_div,
        wr_sb,
        wr_sc,
        wr_div,
        out_sb,
        out_sc,
    )
    has_l, has_r, idx_l, idx_r = _window_neighbours(p, P, BLOCK_S, BLOCK_P)
    pos = (p.to(tl.int64) * pos_stride)[None, :]
    state = state_ptr + (s * 2 * P)[:, None] + p[None, :]
    j0 = k * HALO
    n = tl.minimum(HALO, L - j0)

    _wait_for_block_before(sync_ptr, ticket, k, seg, NUM_SEG, NUM_GROUPS)
    # ".cg": past L1, which may hold this scratch line from two blocks ago.
    h = tl.load(
        state + ((k + 1) % 2) * P, mask=inside & ((p * 0 + k) > 0)[None, :], other=0.0, cache_modifier=".cg"
    ).to(ACC)

    line, _prev = line_offsets(0, L, j0, line_stride, REVERSE)
    mg = inside & ((p * 0 + _starts_tile(j0, L, CHUNK, REVERSE).to(tl.int32)) == 0)[None, :]
    xv, lv, al, am, ar = line_inputs(
        x_ptr,
        lam_ptr,
        wl_ptr,
        wm_ptr,
        wr_ptr,
        x_base,
        lam_base,
        wl_base,
        wm_base,
        wr_base,
        line + pos,
        inside,
        mg,
        ACC,
    )
    for t in range(0, n):
        # Prefetch line t + 1 of the block (its gates are not read if it starts a tile).
        line_next, _prev = line_offsets(0, L, j0 + t + 1, line_stride, REVERSE)
        m_next = inside & ((p * 0 + t + 1) < n)[None, :]
        start_next = _starts_tile(j0 + t + 1, L, CHUNK, REVERSE).to(tl.int32)
        mg_next = m_next & ((p * 0 + start_next) == 0)[None, :]
        xn, ln, aln, amn, arn = line_inputs(
            x_ptr,
            lam_ptr,
            wl_ptr,
            wm_ptr,
            wr_ptr,
            x_base,
            lam_base,
            wl_base,
            wm_base,
            wr_base,
            line_next + pos,
            m_next,
            mg_next,
            ACC,
        )
        al, am, ar = forward_gates(al, am, ar, has_l, has_r, NORMALIZE)
        h = tl.where(mg, h, 0.0)  # a line that starts a tile gets no state from the line before
        hl, hr = neighbours(h, h, idx_l, idx_r, has_l, has_r)
        h = lv * xv + al * hl + am * h + ar * hr
        tl.store(out_ptr + out_base + line + pos, h.to(out_ptr.dtype.element_ty), mask=own)
        xv, lv, al, am, ar = xn, ln, aln, amn, arn
        mg = mg_next
        line = line_next

    tl.store(state + (k % 2) * P, h, mask=own)
    _publish(sync_ptr, ticket)


@triton.jit
def line_scan_bwd_split_kernel(
    g_ptr,
    h_ptr,
    x_ptr,
    lam_ptr,
    wl_ptr,
    wm_ptr,
    wr_ptr,
    dx_ptr,
    dlam_ptr,
    dwl_ptr,
    dwm_ptr,
    dwr_ptr,
    state_ptr,
    sync_ptr,
    g_sb,
    g_sc,
    h_sb,
    h_sc,
    x_sb,
    x_sc,
    lam_sb,
    lam_sc,
    lam_div,
    wl_sb,
    wl_sc,
    wl_div,
    wm_sb,
    wm_sc,
    wm_div,
    wr_sb,
    wr_sc,
    wr_div,
    dx_sb,
    dx_sc,
    S,
    C,
    H,
    W,
    L,
    P,
    CHUNK,
    SEG,
    HALO,
    NUM_SEG,
    NUM_GROUPS,
    VERTICAL: tl.constexpr,
    REVERSE: tl.constexpr,
    NORMALIZE: tl.constexpr,
    ACCUMULATE_DX: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Adjoint recurrence over time block ``k`` of one segment, time blocks counted from the end
    of the scan (block k covers scan steps ``[L - (k+1)·HALO, L - k·HALO)``, walked downwards).

    The state carried between blocks is ``q_k = w_k a`` of the block's last line (scratch
    ``(S, 2, 3, P)`` float32); gradients as in :func:`adjoint_line`, written for ``own``
    positions only.
    """
    ticket, k, seg, s, p, inside, own = _split_program(sync_ptr, S, P, SEG, HALO, NUM_SEG, NUM_GROUPS, BLOCK_S, BLOCK_P)
    b = s // C
    c = s % C
    line_stride, pos_stride = line_strides(W, VERTICAL)
    g_base, h_base, x_base, lam_base, wl_base, wm_base, wr_base, dx_base, d_base = adjoint_bases(
        s,
        b,
        c,
        H,
        W,
        g_sb,
        g_sc,
        h_sb,
        h_sc,
        x_sb,
        x_sc,
        lam_sb,
        lam_sc,
        lam_div,
        wl_sb,
        wl_sc,
        wl_div,
        wm_sb,
        wm_sc,
        wm_div,
        wr_sb,
        wr_sc,
        wr_div,
        dx_sb,
        dx_sc,
    )
    has_l, has_r, idx_l, idx_r = _window_neighbours(p, P, BLOCK_S, BLOCK_P)
    pos = (p.to(tl.int64) * pos_stride)[None, :]
    state = state_ptr + (s * 6 * P)[:, None] + p[None, :]
    j_end = L - k * HALO
    n = tl.minimum(HALO, j_end)

    _wait_for_block_before(sync_ptr, ticket, k, seg, NUM_SEG, NUM_GROUPS)
    before = state + ((k + 1) % 2) * 3 * P
    m0 = inside & ((p * 0 + k) > 0)[None, :]
    ql = tl.load(before, mask=m0, other=0.0, cache_modifier=".cg").to(ACC)
    qm = tl.load(before + P, mask=m0, other=0.0, cache_modifier=".cg").to(ACC)
    qr = tl.load(before + 2 * P, mask=m0, other=0.0, cache_modifier=".cg").to(ACC)
    for tt in range(0, n):
        j = j_end - 1 - tt
        line, prev_line = line_offsets(0, L, j, line_stride, REVERSE)
        a = tl.load(g_ptr + g_base + line + pos, mask=inside, other=0.0).to(ACC)
        from_l, from_r = neighbours(qr, ql, idx_l, idx_r, has_l, has_r)
        a += from_r + qm + from_l
        mp = inside & ((p * 0 + _starts_tile(j, L, CHUNK, REVERSE).to(tl.int32)) == 0)[None, :]
        ql, qm, qr = adjoint_line(
            a,
            line + pos,
            prev_line + pos,
            own,
            mp,
            has_l,
            has_r,
            pos_stride,
            h_ptr,
            x_ptr,
            lam_ptr,
            wl_ptr,
            wm_ptr,
            wr_ptr,
            dx_ptr,
            dlam_ptr,
            dwl_ptr,
            dwm_ptr,
            dwr_ptr,
            h_base,
            x_base,
            lam_base,
            wl_base,
            wm_base,
            wr_base,
            dx_base,
            d_base,
            NORMALIZE,
            ACCUMULATE_DX,
            ACC,
        )
        # A line that starts a tile passes nothing to the line before (its gates do not count).
        ql = tl.where(mp, ql, 0.0)
        qm = tl.where(mp, qm, 0.0)
        qr = tl.where(mp, qr, 0.0)

    after = state + (k % 2) * 3 * P
    tl.store(after, ql, mask=own)
    tl.store(after + P, qm, mask=own)
    tl.store(after + 2 * P, qr, mask=own)
    _publish(sync_ptr, ticket)
