"""``@triton.jit`` helpers of the three line-scan kernel variants (inlined by the compiler):
slice and base-offset set-up, line indexing, gate loading and the per-line gradient maths of the
adjoint. Index conventions: :mod:`gspn.ops.line_scan.kernels`."""

from __future__ import annotations

import triton
import triton.language as tl

from ..._triton.gates import load_neighbours, stabilize_logits

# -------------------------------------------------------------------------------------------------
# Set-up: slices, strides, base offsets, tiles and lines.


@triton.jit
def line_strides(W, VERTICAL: tl.constexpr):
    """``(LINE_STRIDE, POS_STRIDE)`` of a dense ``H × W`` plane: rows for vertical scans, else columns."""
    if VERTICAL:
        return W, 1
    return 1, W


@triton.jit
def program_setup(S, C, W, VERTICAL: tl.constexpr, BLOCK_S: tl.constexpr):
    """What every kernel starts from: this program's tile-program index ``pid_c`` and their number,
    its ``BLOCK_S`` slices ``s`` (int64, grid axis 0), which of them exist, their ``(b, c)``, and
    the line/position strides."""
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    n_cprog = tl.num_programs(1)
    s = (pid_s * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    line_stride, pos_stride = line_strides(W, VERTICAL)
    return pid_c, n_cprog, s, s < S, s // C, s % C, line_stride, pos_stride


@triton.jit
def slice_base(b, c, stride_b, stride_c):
    """Element offsets ``[BLOCK_S, 1]`` of the planes ``(b, c)`` of a ``(B, C, H, W)`` tensor."""
    return (b * stride_b + c * stride_c)[:, None]


@triton.jit
def param_base(b, c, stride_b, stride_c, chan_div):
    """Element offsets ``[BLOCK_S, 1]`` of the parameter planes serving image slices ``(b, c)``.

    A batch stride of 0 shares the parameter over the batch; channel ``c`` reads parameter channel
    ``c // chan_div`` (channel groups).
    """
    return (b * stride_b + (c // chan_div) * stride_c)[:, None]


@triton.jit
def param_bases(
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
    """:func:`param_base` of λ and of the three gates."""
    return (
        param_base(b, c, lam_sb, lam_sc, lam_div),
        param_base(b, c, wl_sb, wl_sc, wl_div),
        param_base(b, c, wm_sb, wm_sc, wm_div),
        param_base(b, c, wr_sb, wr_sc, wr_div),
    )


@triton.jit
def forward_bases(
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
    lam_base, wl_base, wm_base, wr_base = param_bases(
        b, c, lam_sb, lam_sc, lam_div, wl_sb, wl_sc, wl_div, wm_sb, wm_sc, wm_div, wr_sb, wr_sc, wr_div
    )
    return (slice_base(b, c, x_sb, x_sc), lam_base, wl_base, wm_base, wr_base, slice_base(b, c, out_sb, out_sc))


@triton.jit
def adjoint_bases(
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
    lam_base, wl_base, wm_base, wr_base = param_bases(
        b, c, lam_sb, lam_sc, lam_div, wl_sb, wl_sc, wl_div, wm_sb, wm_sc, wm_div, wr_sb, wr_sc, wr_div
    )
    return (
        slice_base(b, c, g_sb, g_sc),
        slice_base(b, c, h_sb, h_sc),
        slice_base(b, c, x_sb, x_sc),
        lam_base,
        wl_base,
        wm_base,
        wr_base,
        slice_base(b, c, dx_sb, dx_sc),
        (s * H * W)[:, None],
    )


@triton.jit
def tile(chunk, CHUNK, L):
    """First line and number of lines of tile ``chunk`` (the last tile may be shorter)."""
    i_lo = chunk * CHUNK
    return i_lo, tl.minimum(CHUNK, L - i_lo)


@triton.jit
def line_offsets(i_lo, n, t, line_stride, REVERSE: tl.constexpr):
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
def whole_line(P, s_ok, pos_stride, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr):
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
def load_gates(wl_ptr, wm_ptr, wr_ptr, wl_base, wm_base, wr_base, off, mask, ACC: tl.constexpr):
    """The three gates (or their logits) of one line, as ACC (0 where ``mask`` is off)."""
    al = tl.load(wl_ptr + wl_base + off, mask=mask, other=0.0).to(ACC)
    am = tl.load(wm_ptr + wm_base + off, mask=mask, other=0.0).to(ACC)
    ar = tl.load(wr_ptr + wr_base + off, mask=mask, other=0.0).to(ACC)
    return al, am, ar


@triton.jit
def line_inputs(
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
    al, am, ar = load_gates(wl_ptr, wm_ptr, wr_ptr, wl_base, wm_base, wr_base, off, mg, ACC)
    return xv, lv, al, am, ar


@triton.jit
def adjoint_line(
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

    al, am, ar = load_gates(wl_ptr, wm_ptr, wr_ptr, wl_base, wm_base, wr_base, off, mp, ACC)
    al = tl.where(has_l, al, 0.0)  # a missing neighbour's gate is never read (see forward_gates)
    ar = tl.where(has_r, ar, 0.0)
    hl, hm, hr = load_neighbours(h_ptr + h_base + prev_off, pos_stride, mp, has_l, has_r, ACC)
    gl = a * hl
    gm = a * hm
    gr = a * hr
    if NORMALIZE:
        al, am, ar, cl, cm, cr = stabilize_logits(al, am, ar, has_l, has_r)
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
