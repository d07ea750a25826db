"""Memory variants of the line scan: lines of any length, in blocks of ``BLOCK_P`` positions; the
state of the previous line goes through memory, with a block barrier between lines."""

from __future__ import annotations

import triton
import triton.language as tl

from ..._triton.gates import forward_gates, load_neighbours
from .common import (
    adjoint_bases,
    adjoint_line,
    forward_bases,
    line_inputs,
    line_offsets,
    program_setup,
    tile,
)

# -------------------------------------------------------------------------------------------------
# Memory variants: lines of any length, in blocks of BLOCK_P positions; the state of the previous
# line goes through memory, with a block barrier between lines.


@triton.jit
def line_scan_fwd_kernel(
    x_ptr,
    lam_ptr,
    wl_ptr,
    wm_ptr,
    wr_ptr,
    out_ptr,
    state_ptr,
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
    NUM_CHUNKS,
    VERTICAL: tl.constexpr,
    REVERSE: tl.constexpr,
    NORMALIZE: tl.constexpr,
    STATE_IN_OUT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Forward recurrence ``h[l] = λ x + w_l h[l-1, p-1] + w_m h[l-1, p] + w_r h[l-1, p+1]``.

    Masks are built as vectors (``(p * 0 + t) > 0``) rather than by broadcasting a scalar
    condition: the Triton interpreter mis-types ``tensor & 0-d tensor``.

    Grid: ``(cdiv(S, BLOCK_S), chunk_programs)``; program ``(i, j)`` scans slices
    ``[i·BLOCK_S, (i+1)·BLOCK_S)`` over the tiles ``j, j + chunk_programs, …``.
    ``state_ptr``: float ``(chunk_programs, S, 2, P)`` scratch, unused if ``STATE_IN_OUT``.
    """
    pid_c, n_cprog, s, s_ok, b, c, line_stride, pos_stride = program_setup(S, C, W, VERTICAL, BLOCK_S)
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
    st_base = ((pid_c * S + s) * 2 * P)[:, None]

    for chunk in range(pid_c, NUM_CHUNKS, n_cprog):
        i_lo, n = tile(chunk, CHUNK, L)
        for t in range(0, n):
            line, prev_line = line_offsets(i_lo, n, t, line_stride, REVERSE)
            slot = t % 2
            for p0 in range(0, P, BLOCK_P):
                p = p0 + tl.arange(0, BLOCK_P)
                m = s_ok[:, None] & (p < P)[None, :]
                has_l = (p >= 1)[None, :]
                has_r = (p + 1 < P)[None, :]
                mp = m & ((p * 0 + t) > 0)[None, :]  # the line does not start a tile
                off = (line + p.to(tl.int64) * pos_stride)[None, :]
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
                    off,
                    m,
                    mp,
                    ACC,
                )
                h = lv * xv
                al, am, ar = forward_gates(al, am, ar, has_l, has_r, NORMALIZE)
                if STATE_IN_OUT:
                    prev = out_ptr + out_base + (prev_line + p.to(tl.int64) * pos_stride)[None, :]
                    hl, hm, hr = load_neighbours(prev, pos_stride, mp, has_l, has_r, ACC)
                else:
                    prev = state_ptr + st_base + (1 - slot) * P + p[None, :]
                    hl, hm, hr = load_neighbours(prev, 1, mp, has_l, has_r, ACC)
                h += al * hl + am * hm + ar * hr
                tl.store(out_ptr + out_base + off, h.to(out_ptr.dtype.element_ty), mask=m)
                if not STATE_IN_OUT:
                    tl.store(state_ptr + st_base + slot * P + p[None, :], h, mask=m)
            # Line i must be complete (all blocks, all threads) before line i+1 reads it.
            tl.debug_barrier()


@triton.jit
def line_scan_bwd_kernel(
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
    NUM_CHUNKS,
    VERTICAL: tl.constexpr,
    REVERSE: tl.constexpr,
    NORMALIZE: tl.constexpr,
    ACCUMULATE_DX: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Adjoint recurrence over the lines of each tile in reverse scan order.

    ``a[l, p] = g[l, p] + q_l[l+1, p+1] + q_m[l+1, p] + q_r[l+1, p-1]`` with ``q_k[l] = w_k[l] a[l]``
    (kept in the float scratch ``state_ptr``: ``(chunk_programs, S, 2, 3, P)``); the gradients of
    each line are those of :func:`adjoint_line`. ``dlam``/``dw*`` are dense ``(B, C, H, W)``.
    """
    pid_c, n_cprog, s, s_ok, b, c, line_stride, pos_stride = program_setup(S, C, W, VERTICAL, BLOCK_S)
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
    st_base = ((pid_c * S + s) * 6 * P)[:, None]

    for chunk in range(pid_c, NUM_CHUNKS, n_cprog):
        i_lo, n = tile(chunk, CHUNK, L)
        for tt in range(0, n):
            t = n - 1 - tt  # position of the line inside its tile, in scan order
            line, prev_line = line_offsets(i_lo, n, t, line_stride, REVERSE)
            slot = t % 2
            for p0 in range(0, P, BLOCK_P):
                p = p0 + tl.arange(0, BLOCK_P)
                m = s_ok[:, None] & (p < P)[None, :]
                has_l = (p >= 1)[None, :]
                has_r = (p + 1 < P)[None, :]
                pos = p.to(tl.int64) * pos_stride
                off = (line + pos)[None, :]

                # Adjoint state of this line.
                a = tl.load(g_ptr + g_base + off, mask=m, other=0.0).to(ACC)
                mn = m & ((p * 0 + tt) > 0)[None, :]  # the next line is in the same tile
                nxt = state_ptr + st_base + (1 - slot) * 3 * P + p[None, :]
                a += tl.load(nxt + 1, mask=mn & has_r, other=0.0)  # q_l[l+1, p+1]
                a += tl.load(nxt + P, mask=mn, other=0.0)  # q_m[l+1, p]
                a += tl.load(nxt + 2 * P - 1, mask=mn & has_l, other=0.0)  # q_r[l+1, p-1]

                # Gradients of this line, and q_k = w_k a for the line before.
                mp = m & ((p * 0 + t) > 0)[None, :]  # the line does not start a tile
                ql, qm, qr = adjoint_line(
                    a,
                    off,
                    (prev_line + pos)[None, :],
                    m,
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
                cur = state_ptr + st_base + slot * 3 * P + p[None, :]
                tl.store(cur, ql, mask=mp)
                tl.store(cur + P, qm, mask=mp)
                tl.store(cur + 2 * P, qr, mask=mp)
            # Line l must be complete before line l-1 reads its q_k.
            tl.debug_barrier()
