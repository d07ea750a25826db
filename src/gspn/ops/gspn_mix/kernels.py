"""Triton kernels of the fused GSPN layer (imported lazily, with triton): the register and memory
variants of the forward (``gspn_mix_fwd_reg_kernel``, ``gspn_mix_fwd_kernel``) and the register
adjoint (``gspn_mix_bwd_reg_kernel``). What they compute and how the work is cut: the doc of
:mod:`gspn.ops.gspn_mix.triton`, which launches them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._triton.gates import forward_gates, load_neighbours, neighbours, stabilize_logits

__all__ = ["KINDS", "gspn_mix_bwd_reg_kernel", "gspn_mix_fwd_kernel", "gspn_mix_fwd_reg_kernel"]

# Packed weight rows per channel: 3 gate logits, λ, m_k·u_k, Σ_k m_k D_k.
KINDS = tl.constexpr(6)


# -------------------------------------------------------------------------------------------------
# Kernels.


@triton.jit
def _line_pos_strides(sh, sw, VERTICAL: tl.constexpr):
    """``(line stride, position stride)`` of an image tensor: rows for vertical scans, else columns."""
    if VERTICAL:
        return sh, sw
    return sw, sh


@triton.jit
def _line_index(i_lo, n, t, REVERSE: tl.constexpr):
    """Image index (int64) of scan-order line ``t`` of the tile ``[i_lo, i_lo + n)``."""
    if REVERSE:  # noqa: SIM108 (a constexpr branch, clearer than a ternary in a Triton kernel)
        i = i_lo + n - 1 - t
    else:
        i = i_lo + t
    return i.to(tl.int64)


@triton.jit
def _generate(z_ptrs, z_sc, w_rows, w_ok, m, S, FIRST: tl.constexpr, ACC: tl.constexpr):
    """One line's parameters from its proxy line: ``Σ_j W[c, kind, j] · z[b, j, p]`` for the six
    kinds (``z_ptrs``: ``[BLOCK_S, BLOCK_P]`` pointers of proxy channel 0; ``w_rows``:
    ``[BLOCK_S, 1]`` pointers of ``W[c, 0, 0]``). The merged skip is generated only if ``FIRST``."""
    al = tl.full(m.shape, 0, ACC)
    am = tl.full(m.shape, 0, ACC)
    ar = tl.full(m.shape, 0, ACC)
    lam = tl.full(m.shape, 0, ACC)
    u = tl.full(m.shape, 0, ACC)
    d = tl.full(m.shape, 0, ACC)
    for j in range(0, S):
        z = tl.load(z_ptrs + j * z_sc, mask=m, other=0.0).to(ACC)
        w = w_rows + j
        al += tl.load(w, mask=w_ok, other=0.0) * z
        am += tl.load(w + S, mask=w_ok, other=0.0) * z
        ar += tl.load(w + 2 * S, mask=w_ok, other=0.0) * z
        lam += tl.load(w + 3 * S, mask=w_ok, other=0.0) * z
        u += tl.load(w + 4 * S, mask=w_ok, other=0.0) * z
        if FIRST:
            d += tl.load(w + 5 * S, mask=w_ok, other=0.0) * z
    return al, am, ar, lam, u, d


@triton.jit
def _emit(h, u, d, xv, acc_ptrs, out_ptrs, m, FIRST: tl.constexpr, LAST: tl.constexpr, ACC: tl.constexpr):
    """Add this direction's ``(m_k u_k) ⊙ h`` (and, if ``FIRST``, the merged skip ``D ⊙ x``) to ``y``."""
    if FIRST:  # noqa: SIM108 (a constexpr branch: the first launch reads no accumulator)
        y = d * xv + u * h
    else:
        y = tl.load(acc_ptrs, mask=m, other=0.0).to(ACC) + u * h
    if LAST:
        tl.store(out_ptrs, y.to(out_ptrs.dtype.element_ty), mask=m)
    else:
        tl.store(acc_ptrs, y.to(acc_ptrs.dtype.element_ty), mask=m)


@triton.jit
def _setup(
    NS,
    C,
    S,
    x_sb,
    x_sc,
    x_sh,
    x_sw,
    z_sb,
    z_sh,
    z_sw,
    a_sb,
    a_sc,
    a_sh,
    a_sw,
    o_sb,
    o_sc,
    o_sh,
    o_sw,
    VERTICAL: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Slices of this program, which exist, their plane offsets ``[BLOCK_S, 1]`` in x, proxy, the
    accumulator and the output, the weight-row offsets, and the line/position strides."""
    s = (tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    s_ok = s < NS
    b = s // C
    c = s % C
    x_l, x_p = _line_pos_strides(x_sh, x_sw, VERTICAL)
    z_l, z_p = _line_pos_strides(z_sh, z_sw, VERTICAL)
    a_l, a_p = _line_pos_strides(a_sh, a_sw, VERTICAL)
    o_l, o_p = _line_pos_strides(o_sh, o_sw, VERTICAL)
    return (
        s,
        s_ok,
        (b * x_sb + c * x_sc)[:, None],
        (b * z_sb)[:, None],
        (b * a_sb + c * a_sc)[:, None],
        (b * o_sb + c * o_sc)[:, None],
        (c * KINDS * S)[:, None],
        x_l,
        x_p,
        z_l,
        z_p,
        a_l,
        a_p,
        o_l,
        o_p,
    )


@triton.jit
def gspn_mix_fwd_kernel(
    x_ptr,
    z_ptr,
    w_ptr,
    acc_ptr,
    out_ptr,
    state_ptr,
    x_sb,
    x_sc,
    x_sh,
    x_sw,
    z_sb,
    z_sc,
    z_sh,
    z_sw,
    a_sb,
    a_sc,
    a_sh,
    a_sw,
    o_sb,
    o_sc,
    o_sh,
    o_sw,
    NS,
    C,
    S,
    L,
    P,
    CHUNK,
    NUM_CHUNKS,
    VERTICAL: tl.constexpr,
    REVERSE: tl.constexpr,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Memory variant: one direction's term of ``y``, lines of any length in blocks of ``BLOCK_P``.

    ``w_ptr``: packed weights ``(C, 6, S)`` of this direction (ACC); ``state_ptr``: ACC scratch
    ``(tile_programs, NS, 2, P)``; ``acc_ptr``/``out_ptr``: the accumulator and the output (may
    be the same tensor). Masks are built as vectors (``(p * 0 + t) > 0``): the interpreter
    mis-types ``tensor & 0-d tensor``.
    """
    pid_c = tl.program_id(1)
    n_cprog = tl.num_programs(1)
    (s, s_ok, x_base, z_base, a_base, o_base, w_base, x_l, x_p, z_l, z_p, a_l, a_p, o_l, o_p) = _setup(
        NS,
        C,
        S,
        x_sb,
        x_sc,
        x_sh,
        x_sw,
        z_sb,
        z_sh,
        z_sw,
        a_sb,
        a_sc,
        a_sh,
        a_sw,
        o_sb,
        o_sc,
        o_sh,
        o_sw,
        VERTICAL,
        BLOCK_S,
    )
    w_rows = w_ptr + w_base
    w_ok = s_ok[:, None]
    st_base = ((pid_c * NS + s) * 2 * P)[:, None]
    for chunk in range(pid_c, NUM_CHUNKS, n_cprog):
        i_lo = chunk * CHUNK
        n = tl.minimum(CHUNK, L - i_lo)
        for t in range(0, n):
            i = _line_index(i_lo, n, t, REVERSE)
            slot = t % 2
            for p0 in range(0, P, BLOCK_P):
                p = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)
                m = s_ok[:, None] & (p < P)[None, :]
                has_l = (p >= 1)[None, :]
                has_r = (p + 1 < P)[None, :]
                mp = m & ((p * 0 + t) > 0)[None, :]  # the line does not start a tile
                xv = tl.load(x_ptr + x_base + (i * x_l + p * x_p)[None, :], mask=m, other=0.0).to(ACC)
                al, am, ar, lam, u, d = _generate(
                    z_ptr + z_base + (i * z_l + p * z_p)[None, :], z_sc, w_rows, w_ok, m, S, FIRST, ACC
                )
                al, am, ar = forward_gates(al, am, ar, has_l, has_r, True)
                prev = state_ptr + st_base + (1 - slot) * P + p[None, :]
                hl, hm, hr = load_neighbours(prev, 1, mp, has_l, has_r, ACC)
                h = lam * xv + al * hl + am * hm + ar * hr
                tl.store(state_ptr + st_base + slot * P + p[None, :], h, mask=m)
                _emit(
                    h,
                    u,
                    d,
                    xv,
                    acc_ptr + a_base + (i * a_l + p * a_p)[None, :],
                    out_ptr + o_base + (i * o_l + p * o_p)[None, :],
                    m,
                    FIRST,
                    LAST,
                    ACC,
                )
            # Line i must be complete (all blocks, all threads) before line i+1 reads it.
            tl.debug_barrier()


@triton.jit
def gspn_mix_fwd_reg_kernel(
    x_ptr,
    z_ptr,
    w_ptr,
    acc_ptr,
    out_ptr,
    x_sb,
    x_sc,
    x_sh,
    x_sw,
    z_sb,
    z_sc,
    z_sh,
    z_sw,
    a_sb,
    a_sc,
    a_sh,
    a_sw,
    o_sb,
    o_sc,
    o_sh,
    o_sw,
    NS,
    C,
    S,
    L,
    P,
    CHUNK,
    NUM_CHUNKS,
    VERTICAL: tl.constexpr,
    REVERSE: tl.constexpr,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
    STORE_H: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Register variant (``P <= BLOCK_P``): the state of the whole line stays in registers and
    its ``p ± 1`` neighbours come from one ``tl.gather``; arguments as the memory variant's.
    ``STORE_H``: write the hidden map ``h`` of this direction into ``out_ptr`` instead (the
    backward's recomputation; ``y`` is not touched)."""
    pid_c = tl.program_id(1)
    n_cprog = tl.num_programs(1)
    (_s, s_ok, x_base, z_base, a_base, o_base, w_base, x_l, x_p, z_l, z_p, a_l, a_p, o_l, o_p) = _setup(
        NS,
        C,
        S,
        x_sb,
        x_sc,
        x_sh,
        x_sw,
        z_sb,
        z_sh,
        z_sw,
        a_sb,
        a_sc,
        a_sh,
        a_sw,
        o_sb,
        o_sc,
        o_sh,
        o_sw,
        VERTICAL,
        BLOCK_S,
    )
    w_rows = w_ptr + w_base
    w_ok = s_ok[:, None]
    p = tl.arange(0, BLOCK_P).to(tl.int64)
    m = s_ok[:, None] & (p < P)[None, :]
    has_l = tl.broadcast_to((p >= 1)[None, :], [BLOCK_S, BLOCK_P])
    has_r = tl.broadcast_to((p + 1 < P)[None, :], [BLOCK_S, BLOCK_P])
    idx_l = tl.broadcast_to(tl.maximum(p - 1, 0)[None, :], [BLOCK_S, BLOCK_P])
    idx_r = tl.broadcast_to(tl.minimum(p + 1, BLOCK_P - 1)[None, :], [BLOCK_S, BLOCK_P])
    for chunk in range(pid_c, NUM_CHUNKS, n_cprog):
        i_lo = chunk * CHUNK
        n = tl.minimum(CHUNK, L - i_lo)
        h = tl.full([BLOCK_S, BLOCK_P], 0, ACC)  # zero state before the tile's first line
        for t in range(0, n):
            i = _line_index(i_lo, n, t, REVERSE)
            xv = tl.load(x_ptr + x_base + (i * x_l + p * x_p)[None, :], mask=m, other=0.0).to(ACC)
            al, am, ar, lam, u, d = _generate(
                z_ptr + z_base + (i * z_l + p * z_p)[None, :], z_sc, w_rows, w_ok, m, S, FIRST, ACC
            )
            al, am, ar = forward_gates(al, am, ar, has_l, has_r, True)
            hl, hr = neighbours(h, h, idx_l, idx_r, has_l, has_r)
            h = lam * xv + al * hl + am * h + ar * hr
            if STORE_H:
                tl.store(out_ptr + o_base + (i * o_l + p * o_p)[None, :], h.to(out_ptr.dtype.element_ty), mask=m)
            else:
                _emit(
                    h,
                    u,
                    d,
                    xv,
                    acc_ptr + a_base + (i * a_l + p * a_p)[None, :],
                    out_ptr + o_base + (i * o_l + p * o_p)[None, :],
                    m,
                    FIRST,
                    LAST,
                    ACC,
                )


@triton.jit
def _weight_tile(w_rows, kind, S, jr, ok):
    """``W[c, kind, :]`` of this program's channels as a ``[BLOCK_S, BLOCK_J]`` tile (0 outside)."""
    return tl.load(w_rows + kind * S + jr[None, :], mask=ok, other=0.0)


@triton.jit
def _add(a, b):
    return a + b


# Sums are tl.reduce(..., _add) and zeros tl.full(..., 0, ...), not tl.sum / tl.zeros: those are
# @triton.jit functions of Triton's standard library, defined when triton is first imported, which the
# interpreter cannot call from a helper when that import happened without TRITON_INTERPRET set.


@triton.jit
def _project(w, z):
    """``Σ_j w[c, j] z[j, p]``: ``[BLOCK_S, BLOCK_J] × [BLOCK_J, BLOCK_P] → [BLOCK_S, BLOCK_P]``."""
    return tl.reduce(w[:, :, None] * z[None, :, :], 1, _add)


@triton.jit
def _correlate(d, z):
    """``Σ_p d[c, p] z[j, p]``: ``[BLOCK_S, BLOCK_P] × [BLOCK_J, BLOCK_P] → [BLOCK_S, BLOCK_J]``."""
    return tl.reduce(d[:, None, :] * z[None, :, :], 2, _add)


@triton.jit
def _spread(w, d):
    """``Σ_c w[c, j] d[c, p]``: ``[BLOCK_S, BLOCK_J] × [BLOCK_S, BLOCK_P] → [BLOCK_J, BLOCK_P]``."""
    return tl.reduce(w[:, :, None] * d[:, None, :], 0, _add)


@triton.jit
def gspn_mix_bwd_reg_kernel(
    g_ptr,
    x_ptr,
    z_ptr,
    w_ptr,
    h_ptr,
    dx_ptr,
    dz_ptr,
    dw_ptr,
    g_sb,
    g_sc,
    g_sh,
    g_sw,
    x_sb,
    x_sc,
    x_sh,
    x_sw,
    z_sb,
    z_sc,
    z_sh,
    z_sw,
    h_sb,
    h_sc,
    h_sh,
    h_sw,
    dx_sb,
    dx_sc,
    dx_sh,
    dx_sw,
    dz_sblk,
    dz_sb,
    dz_sc,
    dz_sh,
    dz_sw,
    B,
    C,
    S,
    L,
    P,
    CHUNK,
    NUM_CHUNKS,
    NBLK,
    VERTICAL: tl.constexpr,
    REVERSE: tl.constexpr,
    FIRST: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Adjoint of one direction, parameters generated again from the proxy line by line.

    Program ``(i, j)``: batch element ``b = i // NBLK``, channels ``[blk·BLOCK_S, (blk+1)·BLOCK_S)``
    (``blk = i % NBLK``), tiles ``j, j + tile_programs, …`` walked in reverse scan order; the whole
    line is one block (``P <= BLOCK_P``), the ``S`` proxy channels one ``BLOCK_J`` block. With
    ``g = dL/dy``, ``u' = m_k u_k`` and ``q_k = w_k a`` of the line after (in registers)::

        a = u' g + q_left[p+1] + q_mid[p] + q_right[p-1]
        dx += λ a (+ D g in the first launch),   dλ = x a,   du' = g h,   dD = g x (first launch)
        da_k = w_k (1 - sigmoid(a_k)) (a h_prev[p+k-1] - Σ_j w_j a h_prev[p+j-1])

    (gates of a line that starts a tile, or of a missing neighbour, get 0). These per-pixel
    gradients ``dP[c, kind, p]`` never leave registers: ``Σ_p dP z[j, p]`` accumulates in registers
    (``[BLOCK_S, BLOCK_J]`` per kind) and is written once into ``dw_ptr``
    ``(tile_programs, B, C, 6, S)``; each line adds ``Σ_c Σ_kind W[c, kind, j] dP`` to its line of
    the proxy partials ``dz_ptr`` ``(NBLK, B, S, H, W)`` (zero-initialised). Both are owned by this
    program: no atomics. ``h_ptr``: the direction's hidden map, recomputed by the forward kernel
    (``STORE_H``).
    """
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    n_cprog = tl.num_programs(1)
    b = (pid // NBLK).to(tl.int64)
    blk = pid % NBLK
    c = (blk * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    s_ok = c < C
    jr = tl.arange(0, BLOCK_J)
    j_ok = jr < S
    w_ok = s_ok[:, None] & j_ok[None, :]
    g_l, g_p = _line_pos_strides(g_sh, g_sw, VERTICAL)
    x_l, x_p = _line_pos_strides(x_sh, x_sw, VERTICAL)
    z_l, z_p = _line_pos_strides(z_sh, z_sw, VERTICAL)
    h_l, h_p = _line_pos_strides(h_sh, h_sw, VERTICAL)
    dx_l, dx_p = _line_pos_strides(dx_sh, dx_sw, VERTICAL)
    dz_l, dz_p = _line_pos_strides(dz_sh, dz_sw, VERTICAL)
    g_base = (b * g_sb + c * g_sc)[:, None]
    x_base = (b * x_sb + c * x_sc)[:, None]
    h_base = (b * h_sb + c * h_sc)[:, None]
    dx_base = (b * dx_sb + c * dx_sc)[:, None]
    # This program's weights, loaded once: [BLOCK_S, BLOCK_J] per kind.
    w_rows = w_ptr + (c * KINDS * S)[:, None]
    w_al = _weight_tile(w_rows, 0, S, jr, w_ok).to(ACC)
    w_am = _weight_tile(w_rows, 1, S, jr, w_ok).to(ACC)
    w_ar = _weight_tile(w_rows, 2, S, jr, w_ok).to(ACC)
    w_lam = _weight_tile(w_rows, 3, S, jr, w_ok).to(ACC)
    w_u = _weight_tile(w_rows, 4, S, jr, w_ok).to(ACC)
    w_d = _weight_tile(w_rows, 5, S, jr, w_ok).to(ACC)
    z_rows = z_ptr + b * z_sb + (jr.to(tl.int64) * z_sc)[:, None]  # [BLOCK_J, 1]
    dz_rows = dz_ptr + blk * dz_sblk + b * dz_sb + (jr.to(tl.int64) * dz_sc)[:, None]
    p = tl.arange(0, BLOCK_P).to(tl.int64)
    pv = p < P
    m = s_ok[:, None] & pv[None, :]
    mz = j_ok[:, None] & pv[None, :]
    has_l = tl.broadcast_to((p >= 1)[None, :], [BLOCK_S, BLOCK_P])
    has_r = tl.broadcast_to((p + 1 < P)[None, :], [BLOCK_S, BLOCK_P])
    idx_l = tl.broadcast_to(tl.maximum(p - 1, 0)[None, :], [BLOCK_S, BLOCK_P])
    idx_r = tl.broadcast_to(tl.minimum(p + 1, BLOCK_P - 1)[None, :], [BLOCK_S, BLOCK_P])
    dw_al = tl.full([BLOCK_S, BLOCK_J], 0, ACC)
    dw_am = tl.full([BLOCK_S, BLOCK_J], 0, ACC)
    dw_ar = tl.full([BLOCK_S, BLOCK_J], 0, ACC)
    dw_lam = tl.full([BLOCK_S, BLOCK_J], 0, ACC)
    dw_u = tl.full([BLOCK_S, BLOCK_J], 0, ACC)
    dw_d = tl.full([BLOCK_S, BLOCK_J], 0, ACC)
    for chunk in range(pid_c, NUM_CHUNKS, n_cprog):
        i_lo = chunk * CHUNK
        n = tl.minimum(CHUNK, L - i_lo)
        ql = tl.full([BLOCK_S, BLOCK_P], 0, ACC)  # nothing flows back into a tile's last line
        qm = tl.full([BLOCK_S, BLOCK_P], 0, ACC)
        qr = tl.full([BLOCK_S, BLOCK_P], 0, ACC)
        for tt in range(0, n):
            t = n - 1 - tt
            i = _line_index(i_lo, n, t, REVERSE)
            i_prev = _line_index(i_lo, n, t - 1, REVERSE)  # read only where the line does not start the tile
            mp = m & ((p * 0 + t) > 0)[None, :]
            gv = tl.load(g_ptr + g_base + (i * g_l + p * g_p)[None, :], mask=m, other=0.0).to(ACC)
            xv = tl.load(x_ptr + x_base + (i * x_l + p * x_p)[None, :], mask=m, other=0.0).to(ACC)
            hv = tl.load(h_ptr + h_base + (i * h_l + p * h_p)[None, :], mask=m, other=0.0).to(ACC)
            z = tl.load(z_rows + (i * z_l + p * z_p)[None, :], mask=mz, other=0.0).to(ACC)  # [BLOCK_J, BLOCK_P]
            lam = _project(w_lam, z)
            from_l, from_r = neighbours(qr, ql, idx_l, idx_r, has_l, has_r)
            a = tl.where(m, _project(w_u, z) * gv + from_r + qm + from_l, 0.0)
            dx_ptrs = dx_ptr + dx_base + (i * dx_l + p * dx_p)[None, :]
            dx = lam * a + tl.load(dx_ptrs, mask=m, other=0.0).to(ACC)
            if FIRST:
                dx += _project(w_d, z) * gv
            tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=m)
            # Gates: normalised weights and 1 - sigmoid(logit); the state of the line before.
            al = tl.where(has_l, _project(w_al, z), 0.0)
            ar = tl.where(has_r, _project(w_ar, z), 0.0)
            wl, wm, wr, cl, cm, cr = stabilize_logits(al, _project(w_am, z), ar, has_l, has_r)
            hl, hm, hr = load_neighbours(h_ptr + h_base + (i_prev * h_l + p * h_p)[None, :], h_p, mp, has_l, has_r, ACC)
            gl = a * hl
            gm = a * hm
            gr = a * hr
            dot = gl * wl + gm * wm + gr * wr
            gl = tl.where(mp & has_l, wl * cl * (gl - dot), 0.0)
            gm = tl.where(mp, wm * cm * (gm - dot), 0.0)
            gr = tl.where(mp & has_r, wr * cr * (gr - dot), 0.0)
            ql = tl.where(mp, wl * a, 0.0)  # a line that starts a tile passes nothing back
            qm = tl.where(mp, wm * a, 0.0)
            qr = tl.where(mp, wr * a, 0.0)
            dlam = xv * a
            du = gv * hv
            # Weight gradients Σ_p dP z (registers) and proxy gradients Σ_c Σ_kind W dP (this line).
            dw_al += _correlate(gl, z)
            dw_am += _correlate(gm, z)
            dw_ar += _correlate(gr, z)
            dw_lam += _correlate(dlam, z)
            dw_u += _correlate(du, z)
            dzv = _spread(w_al, gl) + _spread(w_am, gm) + _spread(w_ar, gr) + _spread(w_lam, dlam) + _spread(w_u, du)
            if FIRST:
                dd = gv * xv
                dw_d += _correlate(dd, z)
                dzv += _spread(w_d, dd)
            dz_ptrs = dz_rows + (i * dz_l + p * dz_p)[None, :]
            tl.store(dz_ptrs, tl.load(dz_ptrs, mask=mz, other=0.0) + dzv, mask=mz)
    dw_rows = dw_ptr + (((pid_c * B + b) * C + c) * KINDS * S)[:, None] + jr[None, :]
    tl.store(dw_rows, dw_al, mask=w_ok)
    tl.store(dw_rows + S, dw_am, mask=w_ok)
    tl.store(dw_rows + 2 * S, dw_ar, mask=w_ok)
    tl.store(dw_rows + 3 * S, dw_lam, mask=w_ok)
    tl.store(dw_rows + 4 * S, dw_u, mask=w_ok)
    tl.store(dw_rows + 5 * S, dw_d, mask=w_ok)
