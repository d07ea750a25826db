"""Triton kernels of the line scan (imported lazily: only once ``triton`` is known to be present).

Index conventions (see :mod:`gspn.ops.directions`): a *slice* ``s = b·C + c`` is one ``(b, c)``
image plane, dense row-major ``H × W``. Line ``i`` (image index along the scan axis) and position
``p`` (along the perpendicular axis) live at element offset ``i·LINE_STRIDE + p·POS_STRIDE`` of the
plane: ``(W, 1)`` for the vertical directions (lines are rows) and ``(1, W)`` for the horizontal
ones (lines are columns). Reversed directions walk ``i`` downwards. Nothing is flipped or
transposed in memory.

Each program owns ``BLOCK_S`` slices and a set of tiles (chunks) of the scan axis, and walks the
lines of each tile in scan order. Two kernel families (forward and adjoint each):

* *memory* (``line_scan_fwd_kernel``, ``line_scan_bwd_kernel``): a line is processed in blocks of
  ``BLOCK_P`` positions, so lines of any length work; the state of the previous line is exchanged
  through memory (the output itself when it is float32/float64, else a float32 scratch ping-pong
  buffer) with a block-wide barrier between lines;
* *register* (``*_reg_kernel``): the whole line is one block and the state stays in registers.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _stabilize(al, am, ar, has_l, has_r):
    """Normalised gates and ``1 - sigmoid(a_k)`` from raw logits (same formula as ``stabilize``).

    ``w = softmax over the valid neighbours of logsigmoid(a)``: finite for any logits.
    """
    tl_ = tl.exp(-tl.abs(al))
    tm_ = tl.exp(-tl.abs(am))
    tr_ = tl.exp(-tl.abs(ar))
    ls_l = tl.minimum(al, 0.0) - tl.log(1.0 + tl_)
    ls_m = tl.minimum(am, 0.0) - tl.log(1.0 + tm_)
    ls_r = tl.minimum(ar, 0.0) - tl.log(1.0 + tr_)
    top = tl.maximum(ls_m, tl.maximum(tl.where(has_l, ls_l, ls_m), tl.where(has_r, ls_r, ls_m)))
    el = tl.exp(tl.where(has_l, ls_l, float("-inf")) - top)  # exp(-inf) = 0: missing neighbour
    em = tl.exp(ls_m - top)
    er = tl.exp(tl.where(has_r, ls_r, float("-inf")) - top)
    inv = 1.0 / (el + em + er)
    # 1 - sigmoid(a) = sigmoid(-a), from t = exp(-|a|) without cancellation.
    cl = tl.where(al >= 0.0, tl_, 1.0) / (1.0 + tl_)
    cm = tl.where(am >= 0.0, tm_, 1.0) / (1.0 + tm_)
    cr = tl.where(ar >= 0.0, tr_, 1.0) / (1.0 + tr_)
    return el * inv, em * inv, er * inv, cl, cm, cr


@triton.jit
def _param_base(b, c, stride_b, stride_c, chan_div):
    """Element offset of the parameter slice serving image slice ``(b, c)`` (channel groups)."""
    return b * stride_b + (c // chan_div) * stride_c


@triton.jit
def line_scan_fwd_kernel(
    x_ptr, lam_ptr, wl_ptr, wm_ptr, wr_ptr, out_ptr, state_ptr,
    x_sb, x_sc,
    lam_sb, lam_sc, lam_div,
    wl_sb, wl_sc, wl_div,
    wm_sb, wm_sc, wm_div,
    wr_sb, wr_sc, wr_div,
    out_sb, out_sc,
    S, C, W, L, P, CHUNK, NUM_CHUNKS,
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
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    n_cprog = tl.num_programs(1)
    if VERTICAL:
        line_stride = W
        pos_stride = 1
    else:
        line_stride = 1
        pos_stride = W

    s = (pid_s * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    s_ok = s < S
    b = s // C
    c = s % C
    x_base = (b * x_sb + c * x_sc)[:, None]
    lam_base = _param_base(b, c, lam_sb, lam_sc, lam_div)[:, None]
    wl_base = _param_base(b, c, wl_sb, wl_sc, wl_div)[:, None]
    wm_base = _param_base(b, c, wm_sb, wm_sc, wm_div)[:, None]
    wr_base = _param_base(b, c, wr_sb, wr_sc, wr_div)[:, None]
    out_base = (b * out_sb + c * out_sc)[:, None]
    st_base = ((pid_c * S + s) * 2 * P)[:, None]

    for chunk in range(pid_c, NUM_CHUNKS, n_cprog):
        i_lo = chunk * CHUNK
        n = tl.minimum(CHUNK, L - i_lo)
        for t in range(0, n):
            if REVERSE:
                i = i_lo + n - 1 - t
                i_prev = i + 1
            else:
                i = i_lo + t
                i_prev = i - 1
            line = i.to(tl.int64) * line_stride
            prev_line = i_prev.to(tl.int64) * line_stride
            slot = t % 2
            for p0 in range(0, P, BLOCK_P):
                p = p0 + tl.arange(0, BLOCK_P)
                p_ok = p < P
                m = s_ok[:, None] & p_ok[None, :]
                off = (line + p.to(tl.int64) * pos_stride)[None, :]
                xv = tl.load(x_ptr + x_base + off, mask=m, other=0.0).to(ACC)
                lv = tl.load(lam_ptr + lam_base + off, mask=m, other=0.0).to(ACC)
                h = lv * xv
                mp = m & ((p * 0 + t) > 0)[None, :]  # the line does not start a tile
                ml = mp & (p >= 1)[None, :]
                mr = mp & (p + 1 < P)[None, :]
                al = tl.load(wl_ptr + wl_base + off, mask=mp, other=0.0).to(ACC)
                am = tl.load(wm_ptr + wm_base + off, mask=mp, other=0.0).to(ACC)
                ar = tl.load(wr_ptr + wr_base + off, mask=mp, other=0.0).to(ACC)
                if NORMALIZE:
                    has_l = (p >= 1)[None, :]
                    has_r = (p + 1 < P)[None, :]
                    al, am, ar, _cl, _cm, _cr = _stabilize(al, am, ar, has_l, has_r)
                if STATE_IN_OUT:
                    prev = out_ptr + out_base + (prev_line + p.to(tl.int64) * pos_stride)[None, :]
                    hl = tl.load(prev - pos_stride, mask=ml, other=0.0).to(ACC)
                    hm = tl.load(prev, mask=mp, other=0.0).to(ACC)
                    hr = tl.load(prev + pos_stride, mask=mr, other=0.0).to(ACC)
                else:
                    prev = state_ptr + st_base + (1 - slot) * P + p[None, :]
                    hl = tl.load(prev - 1, mask=ml, other=0.0)
                    hm = tl.load(prev, mask=mp, other=0.0)
                    hr = tl.load(prev + 1, mask=mr, other=0.0)
                h += al * hl + am * hm + ar * hr
                tl.store(out_ptr + out_base + off, h.to(out_ptr.dtype.element_ty), mask=m)
                if not STATE_IN_OUT:
                    tl.store(state_ptr + st_base + slot * P + p[None, :], h, mask=m)
            # Line i must be complete (all blocks, all threads) before line i+1 reads it.
            tl.debug_barrier()


@triton.jit
def line_scan_bwd_kernel(
    g_ptr, h_ptr, x_ptr, lam_ptr, wl_ptr, wm_ptr, wr_ptr,
    dx_ptr, dlam_ptr, dwl_ptr, dwm_ptr, dwr_ptr, state_ptr,
    g_sb, g_sc,
    h_sb, h_sc,
    x_sb, x_sc,
    lam_sb, lam_sc, lam_div,
    wl_sb, wl_sc, wl_div,
    wm_sb, wm_sc, wm_div,
    wr_sb, wr_sc, wr_div,
    dx_sb, dx_sc,
    S, C, H, W, L, P, CHUNK, NUM_CHUNKS,
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
    (kept in the float scratch ``state_ptr``: ``(chunk_programs, S, 2, 3, P)``), then
    ``dx = λ a`` (or ``+=``), ``dλ = x a``, ``dw_k[l, p] = a[l, p] h[l-1, p+k-1]``; with
    ``NORMALIZE`` the gate gradients are turned into logit gradients
    ``w_k (1 - s_k) (dw_k - Σ_j dw_j w_j)``. ``dlam``/``dw*`` are dense ``(B, C, H, W)``.
    """
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    n_cprog = tl.num_programs(1)
    if VERTICAL:
        line_stride = W
        pos_stride = 1
    else:
        line_stride = 1
        pos_stride = W

    s = (pid_s * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    s_ok = s < S
    b = s // C
    c = s % C
    g_base = (b * g_sb + c * g_sc)[:, None]
    h_base = (b * h_sb + c * h_sc)[:, None]
    x_base = (b * x_sb + c * x_sc)[:, None]
    lam_base = _param_base(b, c, lam_sb, lam_sc, lam_div)[:, None]
    wl_base = _param_base(b, c, wl_sb, wl_sc, wl_div)[:, None]
    wm_base = _param_base(b, c, wm_sb, wm_sc, wm_div)[:, None]
    wr_base = _param_base(b, c, wr_sb, wr_sc, wr_div)[:, None]
    dx_base = (b * dx_sb + c * dx_sc)[:, None]
    d_base = (s * H * W)[:, None]
    st_base = ((pid_c * S + s) * 6 * P)[:, None]

    for chunk in range(pid_c, NUM_CHUNKS, n_cprog):
        i_lo = chunk * CHUNK
        n = tl.minimum(CHUNK, L - i_lo)
        for tt in range(0, n):
            t = n - 1 - tt  # position of the line inside its tile, in scan order
            if REVERSE:
                i = i_lo + n - 1 - t
                i_prev = i + 1
            else:
                i = i_lo + t
                i_prev = i - 1
            line = i.to(tl.int64) * line_stride
            prev_line = i_prev.to(tl.int64) * line_stride
            slot = t % 2
            for p0 in range(0, P, BLOCK_P):
                p = p0 + tl.arange(0, BLOCK_P)
                p_ok = p < P
                m = s_ok[:, None] & p_ok[None, :]
                ml = (p >= 1)[None, :]
                mr = (p + 1 < P)[None, :]
                off = (line + p.to(tl.int64) * pos_stride)[None, :]

                # Adjoint state of this line.
                a = tl.load(g_ptr + g_base + off, mask=m, other=0.0).to(ACC)
                mn = m & ((p * 0 + tt) > 0)[None, :]  # the next line is in the same tile
                nxt = state_ptr + st_base + (1 - slot) * 3 * P + p[None, :]
                a += tl.load(nxt + 1, mask=mn & mr, other=0.0)  # q_l[l+1, p+1]
                a += tl.load(nxt + P, mask=mn, other=0.0)  # q_m[l+1, p]
                a += tl.load(nxt + 2 * P - 1, mask=mn & ml, other=0.0)  # q_r[l+1, p-1]

                xv = tl.load(x_ptr + x_base + off, mask=m, other=0.0).to(ACC)
                lv = tl.load(lam_ptr + lam_base + off, mask=m, other=0.0).to(ACC)
                dx = lv * a
                if ACCUMULATE_DX:
                    dx += tl.load(dx_ptr + dx_base + off, mask=m, other=0.0).to(ACC)
                tl.store(dx_ptr + dx_base + off, dx.to(dx_ptr.dtype.element_ty), mask=m)
                tl.store(dlam_ptr + d_base + off, (xv * a).to(dlam_ptr.dtype.element_ty), mask=m)

                # Gates of this line: their gradients, and q_k = w_k a for the line before.
                mp = m & ((p * 0 + t) > 0)[None, :]  # the line does not start a tile
                al = tl.load(wl_ptr + wl_base + off, mask=mp, other=0.0).to(ACC)
                am = tl.load(wm_ptr + wm_base + off, mask=mp, other=0.0).to(ACC)
                ar = tl.load(wr_ptr + wr_base + off, mask=mp, other=0.0).to(ACC)
                prev = h_ptr + h_base + (prev_line + p.to(tl.int64) * pos_stride)[None, :]
                hl = tl.load(prev - pos_stride, mask=mp & ml, other=0.0).to(ACC)
                hm = tl.load(prev, mask=mp, other=0.0).to(ACC)
                hr = tl.load(prev + pos_stride, mask=mp & mr, other=0.0).to(ACC)
                gl = a * hl
                gm = a * hm
                gr = a * hr
                if NORMALIZE:
                    al, am, ar, cl, cm, cr = _stabilize(al, am, ar, ml, mr)
                    dot = gl * al + gm * am + gr * ar
                    gl = al * cl * (gl - dot)
                    gm = am * cm * (gm - dot)
                    gr = ar * cr * (gr - dot)
                tl.store(dwl_ptr + d_base + off, gl.to(dwl_ptr.dtype.element_ty), mask=m)
                tl.store(dwm_ptr + d_base + off, gm.to(dwm_ptr.dtype.element_ty), mask=m)
                tl.store(dwr_ptr + d_base + off, gr.to(dwr_ptr.dtype.element_ty), mask=m)
                cur = state_ptr + st_base + slot * 3 * P + p[None, :]
                tl.store(cur, al * a, mask=mp)
                tl.store(cur + P, am * a, mask=mp)
                tl.store(cur + 2 * P, ar * a, mask=mp)
            # Line l must be complete before line l-1 reads its q_k.
            tl.debug_barrier()


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
def _neighbours(left_src, right_src, idx_left, idx_right, has_left, has_right):
    """``(left_src[..., p-1], right_src[..., p+1])`` (zero past the ends) with a single gather."""
    both = tl.gather(tl.join(left_src, right_src), tl.join(idx_left, idx_right), axis=1)
    from_left, from_right = tl.split(both)
    return tl.where(has_left, from_left, 0.0), tl.where(has_right, from_right, 0.0)


@triton.jit
def _line_index(i_lo, n, t, REVERSE: tl.constexpr):
    """Image index along the scan axis of scan-order line ``t`` of the tile ``[i_lo, i_lo + n)``."""
    if REVERSE:
        return i_lo + n - 1 - t
    return i_lo + t


@triton.jit
def _fwd_line_inputs(
    x_ptr, lam_ptr, wl_ptr, wm_ptr, wr_ptr, x_base, lam_base, wl_base, wm_base, wr_base, off, m, mg, ACC
):
    """x, λ and the three gates of one line (gates masked by ``mg``), as ACC."""
    xv = tl.load(x_ptr + x_base + off, mask=m, other=0.0).to(ACC)
    lv = tl.load(lam_ptr + lam_base + off, mask=m, other=0.0).to(ACC)
    al = tl.load(wl_ptr + wl_base + off, mask=mg, other=0.0).to(ACC)
    am = tl.load(wm_ptr + wm_base + off, mask=mg, other=0.0).to(ACC)
    ar = tl.load(wr_ptr + wr_base + off, mask=mg, other=0.0).to(ACC)
    return xv, lv, al, am, ar


@triton.jit
def line_scan_fwd_reg_kernel(
    x_ptr, lam_ptr, wl_ptr, wm_ptr, wr_ptr, out_ptr,
    x_sb, x_sc,
    lam_sb, lam_sc, lam_div,
    wl_sb, wl_sc, wl_div,
    wm_sb, wm_sc, wm_div,
    wr_sb, wr_sc, wr_div,
    out_sb, out_sc,
    S, C, W, L, P, CHUNK, NUM_CHUNKS,
    VERTICAL: tl.constexpr,
    REVERSE: tl.constexpr,
    NORMALIZE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Forward recurrence, state in registers (requires ``P <= BLOCK_P``); grid as the memory variant."""
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    n_cprog = tl.num_programs(1)
    if VERTICAL:
        line_stride = W
        pos_stride = 1
    else:
        line_stride = 1
        pos_stride = W

    s = (pid_s * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    s_ok = s < S
    b = s // C
    c = s % C
    x_base = (b * x_sb + c * x_sc)[:, None]
    lam_base = _param_base(b, c, lam_sb, lam_sc, lam_div)[:, None]
    wl_base = _param_base(b, c, wl_sb, wl_sc, wl_div)[:, None]
    wm_base = _param_base(b, c, wm_sb, wm_sc, wm_div)[:, None]
    wr_base = _param_base(b, c, wr_sb, wr_sc, wr_div)[:, None]
    out_base = (b * out_sb + c * out_sc)[:, None]

    p = tl.arange(0, BLOCK_P)
    m = s_ok[:, None] & (p < P)[None, :]
    has_l = tl.broadcast_to((p >= 1)[None, :], [BLOCK_S, BLOCK_P])
    has_r = tl.broadcast_to((p + 1 < P)[None, :], [BLOCK_S, BLOCK_P])
    idx_l = tl.broadcast_to(tl.maximum(p - 1, 0)[None, :], [BLOCK_S, BLOCK_P])
    idx_r = tl.broadcast_to(tl.minimum(p + 1, BLOCK_P - 1)[None, :], [BLOCK_S, BLOCK_P])
    pos = (p.to(tl.int64) * pos_stride)[None, :]

    for chunk in range(pid_c, NUM_CHUNKS, n_cprog):
        i_lo = chunk * CHUNK
        n = tl.minimum(CHUNK, L - i_lo)
        h = tl.full([BLOCK_S, BLOCK_P], 0.0, ACC)
        # Line 0 of the tile: its gates are never used (zero state), so they are not read.
        line = _line_index(i_lo, n, 0, REVERSE).to(tl.int64) * line_stride
        xv, lv, al, am, ar = _fwd_line_inputs(
            x_ptr, lam_ptr, wl_ptr, wm_ptr, wr_ptr, x_base, lam_base, wl_base, wm_base, wr_base,
            line + pos, m, m & (p < 0)[None, :], ACC,
        )
        for t in range(0, n):
            # Prefetch line t + 1 (nothing past the tile's end).
            line_next = _line_index(i_lo, n, t + 1, REVERSE).to(tl.int64) * line_stride
            m_next = m & ((p * 0 + t + 1) < n)[None, :]
            xn, ln, aln, amn, arn = _fwd_line_inputs(
                x_ptr, lam_ptr, wl_ptr, wm_ptr, wr_ptr, x_base, lam_base, wl_base, wm_base, wr_base,
                line_next + pos, m_next, m_next, ACC,
            )
            if NORMALIZE:
                al, am, ar, _cl, _cm, _cr = _stabilize(al, am, ar, has_l, has_r)
            # h is zero on the first line of a tile, so no extra masking is needed.
            hl, hr = _neighbours(h, h, idx_l, idx_r, has_l, has_r)
            h = lv * xv + al * hl + am * h + ar * hr
            tl.store(out_ptr + out_base + line + pos, h.to(out_ptr.dtype.element_ty), mask=m)
            xv, lv, al, am, ar = xn, ln, aln, amn, arn
            line = line_next


@triton.jit
def line_scan_bwd_reg_kernel(
    g_ptr, h_ptr, x_ptr, lam_ptr, wl_ptr, wm_ptr, wr_ptr,
    dx_ptr, dlam_ptr, dwl_ptr, dwm_ptr, dwr_ptr,
    g_sb, g_sc,
    h_sb, h_sc,
    x_sb, x_sc,
    lam_sb, lam_sc, lam_div,
    wl_sb, wl_sc, wl_div,
    wm_sb, wm_sc, wm_div,
    wr_sb, wr_sc, wr_div,
    dx_sb, dx_sc,
    S, C, H, W, L, P, CHUNK, NUM_CHUNKS,
    VERTICAL: tl.constexpr,
    REVERSE: tl.constexpr,
    NORMALIZE: tl.constexpr,
    ACCUMULATE_DX: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Adjoint recurrence with ``q_k = w_k a`` of the next line kept in registers (``P <= BLOCK_P``)."""
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    n_cprog = tl.num_programs(1)
    if VERTICAL:
        line_stride = W
        pos_stride = 1
    else:
        line_stride = 1
        pos_stride = W

    s = (pid_s * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    s_ok = s < S
    b = s // C
    c = s % C
    g_base = (b * g_sb + c * g_sc)[:, None]
    h_base = (b * h_sb + c * h_sc)[:, None]
    x_base = (b * x_sb + c * x_sc)[:, None]
    lam_base = _param_base(b, c, lam_sb, lam_sc, lam_div)[:, None]
    wl_base = _param_base(b, c, wl_sb, wl_sc, wl_div)[:, None]
    wm_base = _param_base(b, c, wm_sb, wm_sc, wm_div)[:, None]
    wr_base = _param_base(b, c, wr_sb, wr_sc, wr_div)[:, None]
    dx_base = (b * dx_sb + c * dx_sc)[:, None]
    d_base = (s * H * W)[:, None]

    p = tl.arange(0, BLOCK_P)
    m = s_ok[:, None] & (p < P)[None, :]
    has_l = tl.broadcast_to((p >= 1)[None, :], [BLOCK_S, BLOCK_P])
    has_r = tl.broadcast_to((p + 1 < P)[None, :], [BLOCK_S, BLOCK_P])
    idx_l = tl.broadcast_to(tl.maximum(p - 1, 0)[None, :], [BLOCK_S, BLOCK_P])
    idx_r = tl.broadcast_to(tl.minimum(p + 1, BLOCK_P - 1)[None, :], [BLOCK_S, BLOCK_P])
    pos = (p.to(tl.int64) * pos_stride)[None, :]

    for chunk in range(pid_c, NUM_CHUNKS, n_cprog):
        i_lo = chunk * CHUNK
        n = tl.minimum(CHUNK, L - i_lo)
        ql = tl.full([BLOCK_S, BLOCK_P], 0.0, ACC)
        qm = tl.full([BLOCK_S, BLOCK_P], 0.0, ACC)
        qr = tl.full([BLOCK_S, BLOCK_P], 0.0, ACC)
        for tt in range(0, n):
            t = n - 1 - tt
            if REVERSE:
                i = i_lo + n - 1 - t
                i_prev = i + 1
            else:
                i = i_lo + t
                i_prev = i - 1
            off = i.to(tl.int64) * line_stride + pos
            prev_off = i_prev.to(tl.int64) * line_stride + pos
            mp = m & ((p * 0 + t) > 0)[None, :]  # the line does not start a tile

            # q of the next line is zero on the last line of a tile (reset per tile).
            a = tl.load(g_ptr + g_base + off, mask=m, other=0.0).to(ACC)
            from_l, from_r = _neighbours(qr, ql, idx_l, idx_r, has_l, has_r)
            a += from_r + qm + from_l

            xv = tl.load(x_ptr + x_base + off, mask=m, other=0.0).to(ACC)
            lv = tl.load(lam_ptr + lam_base + off, mask=m, other=0.0).to(ACC)
            dx = lv * a
            if ACCUMULATE_DX:
                dx += tl.load(dx_ptr + dx_base + off, mask=m, other=0.0).to(ACC)
            tl.store(dx_ptr + dx_base + off, dx.to(dx_ptr.dtype.element_ty), mask=m)
            tl.store(dlam_ptr + d_base + off, (xv * a).to(dlam_ptr.dtype.element_ty), mask=m)

            al = tl.load(wl_ptr + wl_base + off, mask=mp, other=0.0).to(ACC)
            am = tl.load(wm_ptr + wm_base + off, mask=mp, other=0.0).to(ACC)
            ar = tl.load(wr_ptr + wr_base + off, mask=mp, other=0.0).to(ACC)
            prev = h_ptr + h_base + prev_off
            hl = tl.load(prev - pos_stride, mask=mp & has_l, other=0.0).to(ACC)
            hm = tl.load(prev, mask=mp, other=0.0).to(ACC)
            hr = tl.load(prev + pos_stride, mask=mp & has_r, other=0.0).to(ACC)
            gl = a * hl
            gm = a * hm
            gr = a * hr
            if NORMALIZE:
                al, am, ar, cl, cm, cr = _stabilize(al, am, ar, has_l, has_r)
                dot = gl * al + gm * am + gr * ar
                gl = al * cl * (gl - dot)
                gm = am * cm * (gm - dot)
                gr = ar * cr * (gr - dot)
            tl.store(dwl_ptr + d_base + off, gl.to(dwl_ptr.dtype.element_ty), mask=m)
            tl.store(dwm_ptr + d_base + off, gm.to(dwm_ptr.dtype.element_ty), mask=m)
            tl.store(dwr_ptr + d_base + off, gr.to(dwr_ptr.dtype.element_ty), mask=m)
            ql = al * a
            qm = am * a
            qr = ar * a

