"""Register-resident variants of the line scan: the whole line of every slice in one
``[BLOCK_S, BLOCK_P]`` block, the state in registers between lines."""

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
    program_setup,
    tile,
    whole_line,
)

# -------------------------------------------------------------------------------------------------
# Register-resident variants: the whole line of every slice fits in one [BLOCK_S, BLOCK_P] block
# (BLOCK_P >= P). The state stays in registers between lines and the ±1 neighbours are taken with
# ``tl.gather`` along the line axis, so the only loop-carried dependency is on-chip. In the forward
# kernel the inputs of line t+1 (which do not depend on the state) are loaded while line t is
# computed: an explicit one-line prefetch, because Triton's pipeliner does not pipeline these loads
# (the sm_90 PTX of these loops has no cp.async; see benchmarks/triton_compile_check.py). The same
# prefetch in the backward kernel made ptxas spill heavily (4 KB of stack per thread), so the
# backward loads each line in its own step.


@triton.jit
def line_scan_fwd_reg_kernel(
    x_ptr,
    lam_ptr,
    wl_ptr,
    wm_ptr,
    wr_ptr,
    out_ptr,
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
    ACC: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Forward recurrence, state in registers (requires ``P <= BLOCK_P``); grid as the memory variant."""
    pid_c, n_cprog, _s, s_ok, b, c, line_stride, pos_stride = program_setup(S, C, W, VERTICAL, BLOCK_S)
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
    p, m, has_l, has_r, idx_l, idx_r, pos = whole_line(P, s_ok, pos_stride, BLOCK_S, BLOCK_P)

    for chunk in range(pid_c, NUM_CHUNKS, n_cprog):
        i_lo, n = tile(chunk, CHUNK, L)
        h = tl.full([BLOCK_S, BLOCK_P], 0.0, ACC)
        # Line 0 of the tile: its gates are never used (zero state), so they are not read.
        line, _prev = line_offsets(i_lo, n, 0, line_stride, REVERSE)
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
            m,
            m & (p < 0)[None, :],
            ACC,
        )
        for t in range(0, n):
            # Prefetch line t + 1 (nothing past the tile's end).
            line_next, _prev = line_offsets(i_lo, n, t + 1, line_stride, REVERSE)
            m_next = m & ((p * 0 + t + 1) < n)[None, :]
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
                m_next,
                ACC,
            )
            al, am, ar = forward_gates(al, am, ar, has_l, has_r, NORMALIZE)
            # h is zero on the first line of a tile, so no extra masking is needed.
            hl, hr = neighbours(h, h, idx_l, idx_r, has_l, has_r)
            h = lv * xv + al * hl + am * h + ar * hr
            tl.store(out_ptr + out_base + line + pos, h.to(out_ptr.dtype.element_ty), mask=m)
            xv, lv, al, am, ar = xn, ln, aln, amn, arn
            line = line_next


@triton.jit
def line_scan_bwd_reg_kernel(
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
    """Adjoint recurrence with ``q_k = w_k a`` of the next line kept in registers (``P <= BLOCK_P``)."""
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
    p, m, has_l, has_r, idx_l, idx_r, pos = whole_line(P, s_ok, pos_stride, BLOCK_S, BLOCK_P)

    for chunk in range(pid_c, NUM_CHUNKS, n_cprog):
        i_lo, n = tile(chunk, CHUNK, L)
        ql = tl.full([BLOCK_S, BLOCK_P], 0.0, ACC)
        qm = tl.full([BLOCK_S, BLOCK_P], 0.0, ACC)
        qr = tl.full([BLOCK_S, BLOCK_P], 0.0, ACC)
        for tt in range(0, n):
            t = n - 1 - tt
            line, prev_line = line_offsets(i_lo, n, t, line_stride, REVERSE)
            off = line + pos
            prev_off = prev_line + pos
            mp = m & ((p * 0 + t) > 0)[None, :]  # the line does not start a tile

            # q of the next line is zero on the last line of a tile (reset per tile).
            a = tl.load(g_ptr + g_base + off, mask=m, other=0.0).to(ACC)
            from_l, from_r = neighbours(qr, ql, idx_l, idx_r, has_l, has_r)
            a += from_r + qm + from_l

            ql, qm, qr = adjoint_line(
                a,
                off,
                prev_off,
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
