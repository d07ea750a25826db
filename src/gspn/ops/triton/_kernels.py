"""Triton kernels of the line scan (imported lazily: only once ``triton`` is known to be present).

Index conventions (see :mod:`gspn.ops.directions`): a *slice* ``s = b·C + c`` is one ``(b, c)``
image plane, dense row-major ``H × W``. Line ``i`` (image index along the scan axis) and position
``p`` (along the perpendicular axis) live at element offset ``i·LINE_STRIDE + p·POS_STRIDE`` of the
plane: ``(W, 1)`` for the vertical directions (lines are rows) and ``(1, W)`` for the horizontal
ones (lines are columns). Reversed directions walk ``i`` downwards. Nothing is flipped or
transposed in memory.

Each program of the first two families owns ``BLOCK_S`` slices and a set of tiles (chunks) of the
scan axis, and walks the lines of each tile in scan order. Three kernel families (forward and
adjoint each):

* *memory* (``line_scan_fwd_kernel``, ``line_scan_bwd_kernel``): a line is processed in blocks of
  ``BLOCK_P`` positions, so lines of any length work; the state of the previous line is exchanged
  through memory (the output itself when it is float32/float64, else a float32 scratch ping-pong
  buffer) with a block-wide barrier between lines;
* *register* (``*_reg_kernel``): the whole line is one block and the state stays in registers;
* *split* (``*_split_kernel``): a line is shared by several programs, each holding a window of it
  in registers and recomputing a halo; programs of consecutive time blocks are chained by flags
  (see the section comment above the kernels).

All families share the ``_``-prefixed ``@triton.jit`` helpers below (inlined by the compiler):
slice and base-offset set-up, line indexing, gate loading and normalisation, and the per-line
gradient math of the adjoint.
"""

from __future__ import annotations

import triton
import triton.language as tl

# -------------------------------------------------------------------------------------------------
# Set-up: slices, strides, base offsets, tiles and lines.


@triton.jit
def _line_strides(W, VERTICAL: tl.constexpr):
    """``(LINE_STRIDE, POS_STRIDE)`` of a dense ``H × W`` plane: rows for vertical scans, else columns."""
    if VERTICAL:
        return W, 1
    return 1, W


@triton.jit
def _program_setup(S, C, W, VERTICAL: tl.constexpr, BLOCK_S: tl.constexpr):
    """What every kernel starts from: this program's tile-program index ``pid_c`` and their number,
    its ``BLOCK_S`` slices ``s`` (int64, grid axis 0), which of them exist, their ``(b, c)``, and
    the line/position strides."""
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    n_cprog = tl.num_programs(1)
    s = (pid_s * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    line_stride, pos_stride = _line_strides(W, VERTICAL)
    return pid_c, n_cprog, s, s < S, s // C, s % C, line_stride, pos_stride


@triton.jit
def _slice_base(b, c, stride_b, stride_c):
    """Element offsets ``[BLOCK_S, 1]`` of the planes ``(b, c)`` of a ``(B, C, H, W)`` tensor."""
    return (b * stride_b + c * stride_c)[:, None]


@triton.jit
def _param_base(b, c, stride_b, stride_c, chan_div):
    """Element offsets ``[BLOCK_S, 1]`` of the parameter planes serving image slices ``(b, c)``.

    A batch stride of 0 shares the parameter over the batch; channel ``c`` reads parameter channel
    ``c // chan_div`` (channel groups).
    """
    return (b * stride_b + (c // chan_div) * stride_c)[:, None]


@triton.jit
def _param_bases(
    b,
    c,
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
):
    """:func:`_param_base` of λ and of the three gates."""
    return (
        _param_base(b, c, lam_sb, lam_sc, lam_div),
        _param_base(b, c, wl_sb, wl_sc, wl_div),
        _param_base(b, c, wm_sb, wm_sc, wm_div),
        _param_base(b, c, wr_sb, wr_sc, wr_div),
    )


@triton.jit
def _forward_bases(
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
):
    """Plane offsets ``[BLOCK_S, 1]`` of the forward's tensors: x, λ, the three gates, the output."""
    lam_base, wl_base, wm_base, wr_base = _param_bases(
        b, c, lam_sb, lam_sc, lam_div, wl_sb, wl_sc, wl_div, wm_sb, wm_sc, wm_div, wr_sb, wr_sc, wr_div
    )
    return (_slice_base(b, c, x_sb, x_sc), lam_base, wl_base, wm_base, wr_base, _slice_base(b, c, out_sb, out_sc))


@triton.jit
def _adjoint_bases(
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
):
    """Plane offsets ``[BLOCK_S, 1]`` of the backward's tensors: the output gradient, h, x, λ, the
    three gates, dx, and the dense ``(B·C, H, W)`` gradients of λ and the gates."""
    lam_base, wl_base, wm_base, wr_base = _param_bases(
        b, c, lam_sb, lam_sc, lam_div, wl_sb, wl_sc, wl_div, wm_sb, wm_sc, wm_div, wr_sb, wr_sc, wr_div
    )
    return (
        _slice_base(b, c, g_sb, g_sc),
        _slice_base(b, c, h_sb, h_sc),
        _slice_base(b, c, x_sb, x_sc),
        lam_base,
        wl_base,
        wm_base,
        wr_base,
        _slice_base(b, c, dx_sb, dx_sc),
        (s * H * W)[:, None],
    )


@triton.jit
def _tile(chunk, CHUNK, L):
    """First line and number of lines of tile ``chunk`` (the last tile may be shorter)."""
    i_lo = chunk * CHUNK
    return i_lo, tl.minimum(CHUNK, L - i_lo)


@triton.jit
def _line_offsets(i_lo, n, t, line_stride, REVERSE: tl.constexpr):
    """Element offsets (int64) of scan-order line ``t`` of the tile ``[i_lo, i_lo + n)`` and of the
    line before it in scan order (the one its state comes from)."""
    if REVERSE:
        i = i_lo + n - 1 - t
        i_prev = i + 1
    else:
        i = i_lo + t
        i_prev = i - 1
    return i.to(tl.int64) * line_stride, i_prev.to(tl.int64) * line_stride


@triton.jit
def _whole_line(P, s_ok, pos_stride, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr):
    """Positions of a whole line in one ``[BLOCK_S, BLOCK_P]`` block (register kernels).

    Returns ``p``, the validity mask, the existence of the left/right neighbours, the gather
    indices of the left/right neighbours, and the element offsets of the positions in a line.
    """
    p = tl.arange(0, BLOCK_P)
    m = s_ok[:, None] & (p < P)[None, :]
    has_l = tl.broadcast_to((p >= 1)[None, :], [BLOCK_S, BLOCK_P])
    has_r = tl.broadcast_to((p + 1 < P)[None, :], [BLOCK_S, BLOCK_P])
    idx_l = tl.broadcast_to(tl.maximum(p - 1, 0)[None, :], [BLOCK_S, BLOCK_P])
    idx_r = tl.broadcast_to(tl.minimum(p + 1, BLOCK_P - 1)[None, :], [BLOCK_S, BLOCK_P])
    pos = (p.to(tl.int64) * pos_stride)[None, :]
    return p, m, has_l, has_r, idx_l, idx_r, pos


# -------------------------------------------------------------------------------------------------
# Per-line loads and math.


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
def _forward_gates(al, am, ar, has_l, has_r, NORMALIZE: tl.constexpr):
    """The gates the forward recurrence uses: the loaded values, or normalised logits.

    A missing neighbour's gate is replaced by 0 before anything reads it (0·NaN would be NaN), so
    whatever it holds never reaches a result; gates of a line that starts a tile are loaded as 0.
    """
    al = tl.where(has_l, al, 0.0)
    ar = tl.where(has_r, ar, 0.0)
    if NORMALIZE:
        al, am, ar, _cl, _cm, _cr = _stabilize(al, am, ar, has_l, has_r)
    return al, am, ar


@triton.jit
def _load_gates(wl_ptr, wm_ptr, wr_ptr, wl_base, wm_base, wr_base, off, mask, ACC: tl.constexpr):
    """The three gates (or their logits) of one line, as ACC (0 where ``mask`` is off)."""
    al = tl.load(wl_ptr + wl_base + off, mask=mask, other=0.0).to(ACC)
    am = tl.load(wm_ptr + wm_base + off, mask=mask, other=0.0).to(ACC)
    ar = tl.load(wr_ptr + wr_base + off, mask=mask, other=0.0).to(ACC)
    return al, am, ar


@triton.jit
def _line_inputs(
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
    mg,
    ACC: tl.constexpr,
):
    """x, λ and the three gates of one line (gates masked by ``mg``), as ACC."""
    xv = tl.load(x_ptr + x_base + off, mask=m, other=0.0).to(ACC)
    lv = tl.load(lam_ptr + lam_base + off, mask=m, other=0.0).to(ACC)
    al, am, ar = _load_gates(wl_ptr, wm_ptr, wr_ptr, wl_base, wm_base, wr_base, off, mg, ACC)
    return xv, lv, al, am, ar


@triton.jit
def _load_neighbours(mid, step, m, has_l, has_r, ACC: tl.constexpr):
    """``(mid[-step], mid[0], mid[+step])`` of a pointer block under ``m`` and the existence of the
    left/right neighbours, as ACC (0 where masked off)."""
    left = tl.load(mid - step, mask=m & has_l, other=0.0).to(ACC)
    centre = tl.load(mid, mask=m, other=0.0).to(ACC)
    right = tl.load(mid + step, mask=m & has_r, other=0.0).to(ACC)
    return left, centre, right


@triton.jit
def _neighbours(left_src, right_src, idx_left, idx_right, has_left, has_right):
    """``(left_src[..., p-1], right_src[..., p+1])`` (zero past the ends) with a single gather."""
    both = tl.gather(tl.join(left_src, right_src), tl.join(idx_left, idx_right), axis=1)
    from_left, from_right = tl.split(both)
    return tl.where(has_left, from_left, 0.0), tl.where(has_right, from_right, 0.0)


@triton.jit
def _adjoint_line(
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
    NORMALIZE: tl.constexpr,
    ACCUMULATE_DX: tl.constexpr,
    ACC: tl.constexpr,
):
    """All gradients of one line from its adjoint state ``a``; returns ``q_k = w_k a`` for the line before.

    Writes ``dx = λ a`` (or ``+=``), ``dλ = x a`` and ``dw_k[l, p] = a[l, p] h[l-1, p+k-1]``; with
    ``NORMALIZE`` the gate gradients are turned into logit gradients
    ``w_k (1 - s_k) (dw_k - Σ_j dw_j w_j)``. ``off``/``prev_off``: offsets of this line and of the
    line before in scan order; ``mp``: ``m`` where this line does not start a tile (its gates and
    the state before it are used).
    """
    xv = tl.load(x_ptr + x_base + off, mask=m, other=0.0).to(ACC)
    lv = tl.load(lam_ptr + lam_base + off, mask=m, other=0.0).to(ACC)
    dx = lv * a
    if ACCUMULATE_DX:
        dx += tl.load(dx_ptr + dx_base + off, mask=m, other=0.0).to(ACC)
    tl.store(dx_ptr + dx_base + off, dx.to(dx_ptr.dtype.element_ty), mask=m)
    tl.store(dlam_ptr + d_base + off, (xv * a).to(dlam_ptr.dtype.element_ty), mask=m)

    al, am, ar = _load_gates(wl_ptr, wm_ptr, wr_ptr, wl_base, wm_base, wr_base, off, mp, ACC)
    al = tl.where(has_l, al, 0.0)  # a missing neighbour's gate is never read (see _forward_gates)
    ar = tl.where(has_r, ar, 0.0)
    hl, hm, hr = _load_neighbours(h_ptr + h_base + prev_off, pos_stride, mp, has_l, has_r, ACC)
    gl = a * hl
    gm = a * hm
    gr = a * hr
    if NORMALIZE:
        al, am, ar, cl, cm, cr = _stabilize(al, am, ar, has_l, has_r)
        dot = gl * al + gm * am + gr * ar
        gl = al * cl * (gl - dot)
        gm = am * cm * (gm - dot)
        gr = ar * cr * (gr - dot)
    # Unused gates (missing neighbour, or a line that starts a tile) get exactly 0.
    gl = tl.where(mp & has_l, gl, 0.0)
    gm = tl.where(mp, gm, 0.0)
    gr = tl.where(mp & has_r, gr, 0.0)
    tl.store(dwl_ptr + d_base + off, gl.to(dwl_ptr.dtype.element_ty), mask=m)
    tl.store(dwm_ptr + d_base + off, gm.to(dwm_ptr.dtype.element_ty), mask=m)
    tl.store(dwr_ptr + d_base + off, gr.to(dwr_ptr.dtype.element_ty), mask=m)
    return al * a, am * a, ar * a


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
    pid_c, n_cprog, s, s_ok, b, c, line_stride, pos_stride = _program_setup(S, C, W, VERTICAL, BLOCK_S)
    x_base, lam_base, wl_base, wm_base, wr_base, out_base = _forward_bases(
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
        i_lo, n = _tile(chunk, CHUNK, L)
        for t in range(0, n):
            line, prev_line = _line_offsets(i_lo, n, t, line_stride, REVERSE)
            slot = t % 2
            for p0 in range(0, P, BLOCK_P):
                p = p0 + tl.arange(0, BLOCK_P)
                m = s_ok[:, None] & (p < P)[None, :]
                has_l = (p >= 1)[None, :]
                has_r = (p + 1 < P)[None, :]
                mp = m & ((p * 0 + t) > 0)[None, :]  # the line does not start a tile
                off = (line + p.to(tl.int64) * pos_stride)[None, :]
                xv, lv, al, am, ar = _line_inputs(
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
                al, am, ar = _forward_gates(al, am, ar, has_l, has_r, NORMALIZE)
                if STATE_IN_OUT:
                    prev = out_ptr + out_base + (prev_line + p.to(tl.int64) * pos_stride)[None, :]
                    hl, hm, hr = _load_neighbours(prev, pos_stride, mp, has_l, has_r, ACC)
                else:
                    prev = state_ptr + st_base + (1 - slot) * P + p[None, :]
                    hl, hm, hr = _load_neighbours(prev, 1, mp, has_l, has_r, ACC)
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
    each line are those of :func:`_adjoint_line`. ``dlam``/``dw*`` are dense ``(B, C, H, W)``.
    """
    pid_c, n_cprog, s, s_ok, b, c, line_stride, pos_stride = _program_setup(S, C, W, VERTICAL, BLOCK_S)
    g_base, h_base, x_base, lam_base, wl_base, wm_base, wr_base, dx_base, d_base = _adjoint_bases(
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
        i_lo, n = _tile(chunk, CHUNK, L)
        for tt in range(0, n):
            t = n - 1 - tt  # position of the line inside its tile, in scan order
            line, prev_line = _line_offsets(i_lo, n, t, line_stride, REVERSE)
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
                ql, qm, qr = _adjoint_line(
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
    pid_c, n_cprog, _s, s_ok, b, c, line_stride, pos_stride = _program_setup(S, C, W, VERTICAL, BLOCK_S)
    x_base, lam_base, wl_base, wm_base, wr_base, out_base = _forward_bases(
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
    p, m, has_l, has_r, idx_l, idx_r, pos = _whole_line(P, s_ok, pos_stride, BLOCK_S, BLOCK_P)

    for chunk in range(pid_c, NUM_CHUNKS, n_cprog):
        i_lo, n = _tile(chunk, CHUNK, L)
        h = tl.full([BLOCK_S, BLOCK_P], 0.0, ACC)
        # Line 0 of the tile: its gates are never used (zero state), so they are not read.
        line, _prev = _line_offsets(i_lo, n, 0, line_stride, REVERSE)
        xv, lv, al, am, ar = _line_inputs(
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
            line_next, _prev = _line_offsets(i_lo, n, t + 1, line_stride, REVERSE)
            m_next = m & ((p * 0 + t + 1) < n)[None, :]
            xn, ln, aln, amn, arn = _line_inputs(
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
            al, am, ar = _forward_gates(al, am, ar, has_l, has_r, NORMALIZE)
            # h is zero on the first line of a tile, so no extra masking is needed.
            hl, hr = _neighbours(h, h, idx_l, idx_r, has_l, has_r)
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
    pid_c, n_cprog, s, s_ok, b, c, line_stride, pos_stride = _program_setup(S, C, W, VERTICAL, BLOCK_S)
    g_base, h_base, x_base, lam_base, wl_base, wm_base, wr_base, dx_base, d_base = _adjoint_bases(
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
    p, m, has_l, has_r, idx_l, idx_r, pos = _whole_line(P, s_ok, pos_stride, BLOCK_S, BLOCK_P)

    for chunk in range(pid_c, NUM_CHUNKS, n_cprog):
        i_lo, n = _tile(chunk, CHUNK, L)
        ql = tl.full([BLOCK_S, BLOCK_P], 0.0, ACC)
        qm = tl.full([BLOCK_S, BLOCK_P], 0.0, ACC)
        qr = tl.full([BLOCK_S, BLOCK_P], 0.0, ACC)
        for tt in range(0, n):
            t = n - 1 - tt
            line, prev_line = _line_offsets(i_lo, n, t, line_stride, REVERSE)
            off = line + pos
            prev_off = prev_line + pos
            mp = m & ((p * 0 + t) > 0)[None, :]  # the line does not start a tile

            # q of the next line is zero on the last line of a tile (reset per tile).
            a = tl.load(g_ptr + g_base + off, mask=m, other=0.0).to(ACC)
            from_l, from_r = _neighbours(qr, ql, idx_l, idx_r, has_l, has_r)
            a += from_r + qm + from_l

            ql, qm, qr = _adjoint_line(
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
    line_stride, pos_stride = _line_strides(W, VERTICAL)
    x_base, lam_base, wl_base, wm_base, wr_base, out_base = _forward_bases(
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

    line, _prev = _line_offsets(0, L, j0, line_stride, REVERSE)
    mg = inside & ((p * 0 + _starts_tile(j0, L, CHUNK, REVERSE).to(tl.int32)) == 0)[None, :]
    xv, lv, al, am, ar = _line_inputs(
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
        line_next, _prev = _line_offsets(0, L, j0 + t + 1, line_stride, REVERSE)
        m_next = inside & ((p * 0 + t + 1) < n)[None, :]
        start_next = _starts_tile(j0 + t + 1, L, CHUNK, REVERSE).to(tl.int32)
        mg_next = m_next & ((p * 0 + start_next) == 0)[None, :]
        xn, ln, aln, amn, arn = _line_inputs(
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
        al, am, ar = _forward_gates(al, am, ar, has_l, has_r, NORMALIZE)
        h = tl.where(mg, h, 0.0)  # a line that starts a tile gets no state from the line before
        hl, hr = _neighbours(h, h, idx_l, idx_r, has_l, has_r)
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
    ``(S, 2, 3, P)`` float32); gradients as in :func:`_adjoint_line`, written for ``own``
    positions only.
    """
    ticket, k, seg, s, p, inside, own = _split_program(sync_ptr, S, P, SEG, HALO, NUM_SEG, NUM_GROUPS, BLOCK_S, BLOCK_P)
    b = s // C
    c = s % C
    line_stride, pos_stride = _line_strides(W, VERTICAL)
    g_base, h_base, x_base, lam_base, wl_base, wm_base, wr_base, dx_base, d_base = _adjoint_bases(
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
        line, prev_line = _line_offsets(0, L, j, line_stride, REVERSE)
        a = tl.load(g_ptr + g_base + line + pos, mask=inside, other=0.0).to(ACC)
        from_l, from_r = _neighbours(qr, ql, idx_l, idx_r, has_l, has_r)
        a += from_r + qm + from_l
        mp = inside & ((p * 0 + _starts_tile(j, L, CHUNK, REVERSE).to(tl.int32)) == 0)[None, :]
        ql, qm, qr = _adjoint_line(
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
