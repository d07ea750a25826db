"""Triton kernels of the fused GSPN layer :func:`gspn.ops.gspn_mix` (imported lazily, with triton).

Forward (``mix_forward``): the fusion of the CPU kernel on a GPU. For direction ``k`` and pixel
``p`` with proxy column ``z = proxy[b, :, p]`` (``S`` values)::

    a_k = gate_weight[k] @ z (3 logits per gate channel),  λ_k = lam_weight[k] @ z,  u_k = u_weight[k] @ z
    w_k = stabilize(a_k)   (masked softmax of log-sigmoids: the stability–context condition)
    h_k[l, p] = λ_k x[l, p] + w_left h_k[l-1, p-1] + w_mid h_k[l-1, p] + w_right h_k[l-1, p+1]
    y = Σ_k m_k (u_k ⊙ h_k + D_k ⊙ x) = (Σ_k m_k D_k) ⊙ x + Σ_k (m_k u_k) ⊙ h_k

(``h_k[l-1] = 0`` where line ``l`` starts a tile of ``chunk_size`` lines; ``m = merge_weight``.)

* **Launches.** Four, one per direction in :data:`gspn.ops.DIRECTIONS` order; each accumulates its
  term into ``y``. The first also adds the merged skip ``(Σ_k m_k D_k) ⊙ x`` (one weight matrix
  ``Σ_k m_k skip_weight[k]``, packed on the host), the last writes the result in the output dtype.
  Between launches ``y`` lives in an accumulation buffer (the output itself for float32/float64
  outputs, else one float32 ``(B, C, H, W)`` buffer).
* **What a program owns.** Grid ``(cdiv(B·C, BLOCK_S), tile_programs)``: program ``(i, j)`` owns
  the ``BLOCK_S`` slices ``s = b·C + c`` of group ``i`` and the tiles ``j, j + tile_programs, …`` of
  the scan axis, and walks each tile's lines in scan order. For each line it generates the line's
  gate logits, λ and ``m_k u_k`` (and, in the first launch, the merged ``D``) from the proxy line in
  registers with a loop over ``S`` (weights packed as ``(4, C, 6, S)``, the gates expanded from
  ``Cg`` to ``C``: ``4·6·C·S`` values), normalises the gates, advances the state and
  read-modify-writes its own elements of ``y``. No two programs touch the same element of ``y`` or
  of the scratch, so there is no cross-program communication.
* **Two variants.** *register* (the whole line, ``P <= BLOCK_P``, in one ``[BLOCK_S, BLOCK_P]``
  block; the state stays in registers and the ``p ± 1`` neighbours come from one ``tl.gather``) and
  *memory* (lines of any length in blocks of ``BLOCK_P`` positions; the state of the line before
  goes through a float scratch ping-pong ``(tile_programs, B·C, 2, P)``, with a block barrier
  ``tl.debug_barrier()`` after every line). On a GPU a register build that fails falls back to the
  memory variant.
* **Memory.** ``y`` (plus the float32 accumulator for half outputs), the packed weights and the
  memory variant's scratch (two lines per slice and tile program). No ``(B, 4, C, H, W)`` or
  ``(B, 12·Cg, H, W)`` tensor, and no per-pixel parameter map, is ever materialised.
* **Layouts and dtypes.** Every image tensor is addressed through its four strides (NCHW,
  channels-last, transposed or expanded views are read in place; ``y`` is written channels-last).
  ``x`` and ``proxy`` are read in their own dtype (float32/float64/bfloat16/float16); the state and
  all arithmetic are float32 (float64 for float64 inputs).

Backward (``mix_backward``): **fused**, two launches per direction (eight in all), nothing stored
by the forward but its inputs:

1. the register forward kernel with ``STORE_H`` recomputes the direction's hidden map ``h_k`` into
   one ``(B, C, H, W)`` buffer (reused by the four directions);
2. the adjoint kernel (``gspn_mix_bwd_reg_kernel``) walks each tile's lines in reverse scan order.
   A program owns ``BLOCK_S`` channels of one batch element and the tiles ``j, j + tile_programs,
   …``; it loads its weight rows once, regenerates each line's parameters from the proxy line,
   carries the adjoint ``q_k = w_k a`` of the line after in registers, accumulates ``dx``
   (read-modify-write of its own elements; the first launch adds the merged skip ``D ⊙ g``), and
   reduces the per-pixel gradients of the gate logits, λ, ``m_k u_k`` and ``D`` on the spot: into
   weight partials held in registers (``Σ_p dP z``, written once per program to
   ``(tile_programs, B, C, 6, S)``) and into the proxy gradient of the line (``Σ_c Σ_kind W dP``,
   added to a ``(channel groups, B, S, H, W)`` partial buffer that the host sums). The 1×1
   products are ``[BLOCK_S, BLOCK_J, BLOCK_P]`` broadcasts (``BLOCK_J = next_pow2(S)``).

Extra memory: ``h_k`` and ``dx`` (two maps of ``x``'s size, in the accumulation dtype), the proxy
partials (one proxy-sized buffer per channel group: one in the interpreter, ``C / BLOCK_S`` on a
GPU) and the small weight partials — no per-pixel parameter map, no four hidden maps. The gradient
of ``merge_weight`` follows from the packed weights' gradients (``Σ u_weight[k] ⊙ dW_u'``, and
likewise for the skip).

Fallback: when a direction's lines do not fit one register block (``P`` > 1024 on a GPU, > 256 in
the interpreter), when ``gspn.ops.triton.launch_overrides(kernel="memory")`` is set, or on a GPU where the register
kernels cannot be built, the backward recomputes per direction through the line-scan kernels
instead: that direction's λ, gate logits and u are materialised from the proxy (``einsum``), ``h_k``
by the Triton scan kernel, then the Triton adjoint scan; about 11 ``x``-sized maps at a time, still
one direction at a time (O(x), not O(4·x)).

Verified only under the Triton interpreter (``TRITON_INTERPRET=1``, ``tests/test_triton_mix.py``),
never on a GPU: barriers, launch sizes and speed are unverified there. Ahead-of-time sm_90 builds
(``benchmarks/triton_compile_check.py --kernels mix``) succeed; the backward does not spill registers at the
sizes picked for lines up to 256 positions with ``S <= 8``, spills 8–32 bytes at ``S = 16`` and
~350 bytes for lines of 1024 positions (``[1, 8, 1024]`` products).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import triton
import triton.language as tl

from ..directions import DIRECTIONS, get_direction
from ._backend import _acc_dtype
from ._kernels import _forward_gates, _load_neighbours, _neighbours, _stabilize
from ._launch import (
    _GPU_MAX_BLOCK_P,
    _GPU_MAX_REG_BLOCK_P,
    _GPU_MAX_TILE,
    _INTERP_MAX_BLOCK_P,
    _INTERP_MAX_TILE,
    _MAX_SCRATCH_BYTES,
    _broken,
    _overrides,
    cannot_build,
    cdiv,
    next_pow2,
)

__all__ = ["mix_backward", "mix_forward"]

# Packed weight rows per channel: 3 gate logits, λ, m_k·u_k, Σ_k m_k D_k.
_KINDS = 6
_KINDS_ = tl.constexpr(_KINDS)
# Elements of the backward's [BLOCK_S, BLOCK_J, BLOCK_P] products: ahead-of-time sm_90 builds spill
# at 8192 ([16, 8, 64], 8 warps: 456-568 stack bytes), not at 2048 ([4, 8, 64] and [2, 8, 128], 4 warps).
_GPU_MAX_PRODUCT = 2048
# Key of this module's register kernels in the line-scan backend's record of builds that failed.
_REGISTER = "mix_register"


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
        (c * _KINDS_ * S)[:, None],
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
                al, am, ar = _forward_gates(al, am, ar, has_l, has_r, True)
                prev = state_ptr + st_base + (1 - slot) * P + p[None, :]
                hl, hm, hr = _load_neighbours(prev, 1, mp, has_l, has_r, ACC)
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
            al, am, ar = _forward_gates(al, am, ar, has_l, has_r, True)
            hl, hr = _neighbours(h, h, idx_l, idx_r, has_l, has_r)
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
    w_rows = w_ptr + (c * _KINDS_ * S)[:, None]
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
            from_l, from_r = _neighbours(qr, ql, idx_l, idx_r, has_l, has_r)
            a = tl.where(m, _project(w_u, z) * gv + from_r + qm + from_l, 0.0)
            dx_ptrs = dx_ptr + dx_base + (i * dx_l + p * dx_p)[None, :]
            dx = lam * a + tl.load(dx_ptrs, mask=m, other=0.0).to(ACC)
            if FIRST:
                dx += _project(w_d, z) * gv
            tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=m)
            # Gates: normalised weights and 1 - sigmoid(logit); the state of the line before.
            al = tl.where(has_l, _project(w_al, z), 0.0)
            ar = tl.where(has_r, _project(w_ar, z), 0.0)
            wl, wm, wr, cl, cm, cr = _stabilize(al, _project(w_am, z), ar, has_l, has_r)
            hl, hm, hr = _load_neighbours(
                h_ptr + h_base + (i_prev * h_l + p * h_p)[None, :], h_p, mp, has_l, has_r, ACC
            )
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
    dw_rows = dw_ptr + (((pid_c * B + b) * C + c) * _KINDS_ * S)[:, None] + jr[None, :]
    tl.store(dw_rows, dw_al, mask=w_ok)
    tl.store(dw_rows + S, dw_am, mask=w_ok)
    tl.store(dw_rows + 2 * S, dw_ar, mask=w_ok)
    tl.store(dw_rows + 3 * S, dw_lam, mask=w_ok)
    tl.store(dw_rows + 4 * S, dw_u, mask=w_ok)
    tl.store(dw_rows + 5 * S, dw_d, mask=w_ok)


# -------------------------------------------------------------------------------------------------
# Host side.


def _launch_config(
    slices: int, line_length: int, num_chunks: int, device: torch.device, kernel: str | None = None
) -> dict[str, Any]:
    """Variant and launch parameters of one direction's launch.

    Interpreter (CPU tensors): as few programs as possible (its cost is per program and operation):
    the register variant for lines up to 256, else the memory variant with 256-position blocks;
    up to 4096 elements per program. GPU: the register variant for lines up to 1024 positions,
    slice groups halved until there are 4 programs per SM, the tiles of a local scan spread over
    the second grid axis (memory variant: within a 256 MiB scratch), ~4 (register) or 8 (memory)
    elements per thread. Untuned: no GPU has run these kernels. ``kernel`` forces the variant (it
    takes precedence over :func:`gspn.ops.triton.launch_overrides`; the fallback after a failed
    register build asks for ``"memory"``).
    """
    interp = device.type == "cpu"
    whole = next_pow2(line_length)
    max_reg = _INTERP_MAX_BLOCK_P if interp else _GPU_MAX_REG_BLOCK_P
    fits = whole <= max_reg and (_REGISTER, whole) not in _broken
    kernel = kernel or _forced_kernel() or ("register" if fits else "memory")
    if kernel == "register":
        block_p = whole
    else:
        block_p = _overrides.get("block_p") or min(whole, _INTERP_MAX_BLOCK_P if interp else _GPU_MAX_BLOCK_P)
    if interp:
        block_s = min(next_pow2(slices), max(1, _INTERP_MAX_TILE // block_p))
        chunk_programs, num_warps = 1, 1
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        max_tile = _GPU_MAX_REG_BLOCK_P if kernel == "register" else _GPU_MAX_TILE
        block_s = min(next_pow2(slices), max(1, max_tile // block_p))
        while block_s > 1 and cdiv(slices, block_s) * num_chunks < 4 * sms:
            block_s //= 2
        slice_programs = cdiv(slices, block_s)
        chunk_programs = min(num_chunks, max(1, cdiv(4 * sms, slice_programs)))
        if kernel == "memory":
            per_program = slice_programs * block_s * 2 * line_length * 4
            chunk_programs = max(1, min(chunk_programs, _MAX_SCRATCH_BYTES // max(per_program, 1)))
        per_thread = 4 if kernel == "register" else 8
        num_warps = max(4, min(16, block_s * block_p // (32 * per_thread)))
    cfg = {
        "kernel": kernel,
        "block_s": block_s,
        "block_p": block_p,
        "chunk_programs": chunk_programs,
        "num_warps": num_warps,
    }
    cfg.update({k: v for k, v in _overrides.items() if k in ("block_s", "chunk_programs", "num_warps")})
    cfg["chunk_programs"] = max(1, min(cfg["chunk_programs"], num_chunks, 65535))
    return cfg


def _forced_kernel() -> str | None:
    """The variant forced by :func:`gspn.ops.triton.launch_overrides` (``kernel=``), if this module
    has it: ``"register"`` or ``"memory"`` (a forced ``"split"`` only concerns the line scan)."""
    kernel = _overrides.get("kernel")
    return kernel if kernel in ("register", "memory") else None


def _pack_weights(gate_weight, lam_weight, u_weight, skip_weight, merge_weight, dtype) -> torch.Tensor:
    """``(4, C, 6, S)`` in ``dtype``: gate logits (expanded from ``Cg`` to ``C``), λ, ``m_k u_k``
    and (the same for every k) the merged skip ``Σ_k m_k D_k``."""
    channels = lam_weight.shape[1]
    gate_weight, lam_weight, u_weight, skip_weight, merge_weight = (
        t.to(dtype) for t in (gate_weight, lam_weight, u_weight, skip_weight, merge_weight)
    )
    gates = gate_weight.repeat_interleave(channels // gate_weight.shape[2], dim=2)  # (4, 3, C, S)
    u_scaled = merge_weight.view(-1, 1, 1) * u_weight
    skip = torch.einsum("k,kcs->cs", merge_weight, skip_weight).expand_as(lam_weight)
    kinds = torch.cat([gates, lam_weight.unsqueeze(1), u_scaled.unsqueeze(1), skip.unsqueeze(1)], dim=1)
    return kinds.transpose(1, 2).contiguous()  # (4, C, 6, S)


def _strides4(t: torch.Tensor) -> tuple[int, int, int, int]:
    """Strides of a ``(B, C, H, W)`` tensor, with 0 along size-1 dimensions (never stepped)."""
    return tuple(st if n > 1 else 0 for st, n in zip(t.stride(), t.shape, strict=True))  # type: ignore[return-value]


def mix_forward(
    x: torch.Tensor,
    proxy: torch.Tensor,
    gate_weight: torch.Tensor,
    lam_weight: torch.Tensor,
    u_weight: torch.Tensor,
    skip_weight: torch.Tensor,
    merge_weight: torch.Tensor,
    chunk_size: int | None,
    out: torch.Tensor,
) -> torch.Tensor:
    """The fused forward of :func:`gspn.ops.gspn_mix` into ``out`` (four launches; see the module doc).

    Args:
        x: ``(B, C, H, W)``, ``proxy``: ``(B, S, H, W)``, any strides, float32/float64/bfloat16/float16
            (read in their own dtype).
        gate_weight: ``(4, 3, Cg, S)``; lam_weight, u_weight, skip_weight: ``(4, C, S)``;
            merge_weight: ``(4,)`` (any float dtype; packed in the accumulation dtype).
        chunk_size: ``None`` (global scans) or the tile length along each scan axis.
        out: ``(B, C, H, W)`` result buffer, any strides and float dtype; must not overlap the inputs.

    Arguments are assumed validated (:func:`gspn.ops.gspn_mix` does it) and ``x.numel() > 0``.
    Accumulation is float64 if ``x`` is float64, else float32.

    Returns:
        ``out``.
    """
    batch, channels, height, width = x.shape
    state = proxy.shape[1]
    acc_torch, acc = _acc_dtype(x)
    w = _pack_weights(gate_weight, lam_weight, u_weight, skip_weight, merge_weight, acc_torch)
    y_acc = out if out.dtype == acc_torch else torch.empty(x.shape, dtype=acc_torch, device=x.device)
    slices = batch * channels
    strides = (*_strides4(x), *_strides4(proxy), *_strides4(y_acc), *_strides4(out))
    for k, name in enumerate(DIRECTIONS):
        d = get_direction(name)
        num_lines, line_length = (height, width) if d.vertical else (width, height)
        chunk = min(chunk_size or num_lines, num_lines)
        num_chunks = cdiv(num_lines, chunk)
        cfg = _launch_config(slices, line_length, num_chunks, x.device)
        grid = (cdiv(slices, cfg["block_s"]), cfg["chunk_programs"])
        scalars = (slices, channels, state, num_lines, line_length, chunk, num_chunks)
        flags = {
            "VERTICAL": d.vertical,
            "REVERSE": d.reverse,
            "FIRST": k == 0,
            "LAST": k == len(DIRECTIONS) - 1,
            "ACC": acc,
            "BLOCK_S": cfg["block_s"],
            "num_warps": cfg["num_warps"],
        }
        if cfg["kernel"] == "register":
            try:
                gspn_mix_fwd_reg_kernel[grid](
                    x, proxy, w[k], y_acc, out, *strides, *scalars, **flags, STORE_H=False, BLOCK_P=cfg["block_p"]
                )
                continue
            except Exception as exc:  # a GPU whose Triton cannot build tl.gather: the memory variant
                if x.device.type != "cuda" or not cannot_build(exc):
                    raise
                _broken.add((_REGISTER, cfg["block_p"]))
                warnings.warn(
                    f"gspn: the register gspn_mix Triton kernel cannot be built on this GPU for lines of up to "
                    f"{cfg['block_p']} positions ({type(exc).__name__}: {str(exc)[:300]}); using the memory "
                    "variant for them from now on",
                    RuntimeWarning,
                    stacklevel=2,
                )
                cfg = _launch_config(slices, line_length, num_chunks, x.device, kernel="memory")
                grid = (cdiv(slices, cfg["block_s"]), cfg["chunk_programs"])
                flags.update(BLOCK_S=cfg["block_s"], num_warps=cfg["num_warps"])
        scratch = torch.empty(cfg["chunk_programs"] * slices * 2 * line_length, dtype=acc_torch, device=x.device)
        gspn_mix_fwd_kernel[grid](
            x, proxy, w[k], y_acc, out, scratch, *strides, *scalars, **flags, BLOCK_P=cfg["block_p"]
        )
    return out


def _backward_config(batch: int, channels: int, state: int, line_length: int, num_chunks: int, device: torch.device):
    """Launch parameters of the fused adjoint (register kernel), or ``None`` where it does not apply:
    lines longer than one register block (1024 positions on a GPU, 256 in the interpreter), a GPU
    where that block size failed to build, or ``kernel="memory"`` forced by :func:`gspn.ops.triton.launch_overrides`.

    A program owns ``block_s`` channels of one batch element (its proxy gradients are summed over
    those channels in registers). Its 1×1 products are ``[block_s, block_j, block_p]`` broadcasts
    (``block_j = next_pow2(S)``), kept to at most 2048 elements on a GPU (more spills registers;
    a single channel of a line longer than ``2048 / block_j`` exceeds it and spills); slice groups are halved
    until there are 4 programs per SM and the tiles of a local scan spread over the second grid
    axis, as in the forward. Untuned: no GPU has run it.
    """
    interp = device.type == "cpu"
    block_p = next_pow2(line_length)
    block_j = next_pow2(state)
    if _forced_kernel() == "memory" or (_REGISTER, block_p) in _broken:
        return None
    if block_p > (_INTERP_MAX_BLOCK_P if interp else _GPU_MAX_REG_BLOCK_P):
        return None
    if interp:
        block_s = min(next_pow2(channels), max(1, _INTERP_MAX_TILE // block_p))
        chunk_programs, num_warps = 1, 1
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        block_s = min(
            next_pow2(channels),
            max(1, _GPU_MAX_REG_BLOCK_P // block_p),
            max(1, _GPU_MAX_PRODUCT // (block_p * block_j)),
        )
        while block_s > 1 and batch * cdiv(channels, block_s) * num_chunks < 4 * sms:
            block_s //= 2
        chunk_programs = min(num_chunks, max(1, cdiv(4 * sms, batch * cdiv(channels, block_s))))
        num_warps = max(4, min(16, block_s * block_p // (32 * 4)))
    cfg = {
        "block_s": block_s,
        "block_j": block_j,
        "block_p": block_p,
        "chunk_programs": chunk_programs,
        "num_warps": num_warps,
    }
    cfg.update({k: v for k, v in _overrides.items() if k in ("block_s", "chunk_programs", "num_warps")})
    cfg["chunk_programs"] = max(1, min(cfg["chunk_programs"], num_chunks, 65535))
    return cfg


def _fused_backward(grad, x, proxy, gate_weight, lam_weight, u_weight, skip_weight, merge_weight, chunk_size):
    """The fused backward (two launches per direction; see the module doc), or ``None`` if a
    direction's lines do not fit the register kernel (:func:`_backward_config`)."""
    batch, channels, height, width = x.shape
    state = proxy.shape[1]
    gate_channels = gate_weight.shape[2]
    acc_torch, acc = _acc_dtype(x)
    geometry = []
    for name in DIRECTIONS:
        d = get_direction(name)
        num_lines, line_length = (height, width) if d.vertical else (width, height)
        chunk = min(chunk_size or num_lines, num_lines)
        num_chunks = cdiv(num_lines, chunk)
        cfg = _backward_config(batch, channels, state, line_length, num_chunks, x.device)
        if cfg is None:
            return None
        geometry.append((d, num_lines, line_length, chunk, num_chunks, cfg))
    w = _pack_weights(gate_weight, lam_weight, u_weight, skip_weight, merge_weight, acc_torch)
    h = torch.empty(x.shape, dtype=acc_torch, device=x.device)
    dx = x.new_zeros((batch, height, width, channels), dtype=acc_torch).permute(0, 3, 1, 2)
    nblk = max(cdiv(channels, g[-1]["block_s"]) for g in geometry)
    dz = torch.zeros((nblk, batch, state, height, width), dtype=acc_torch, device=x.device)
    dw = []
    slices = batch * channels
    for k, (d, num_lines, line_length, chunk, num_chunks, cfg) in enumerate(geometry):
        # Recompute h_k (the register forward kernel, slices b·C + c) ...
        fcfg = _launch_config(slices, line_length, num_chunks, x.device)
        strides = (*_strides4(x), *_strides4(proxy), *_strides4(h), *_strides4(h))
        scalars = (slices, channels, state, num_lines, line_length, chunk, num_chunks)
        gspn_mix_fwd_reg_kernel[(cdiv(slices, fcfg["block_s"]), fcfg["chunk_programs"])](
            x,
            proxy,
            w[k],
            h,
            h,
            *strides,
            *scalars,
            VERTICAL=d.vertical,
            REVERSE=d.reverse,
            FIRST=False,
            LAST=False,
            STORE_H=True,
            ACC=acc,
            BLOCK_S=fcfg["block_s"],
            BLOCK_P=next_pow2(line_length),
            num_warps=fcfg["num_warps"],
        )
        # ... then its adjoint, channel groups of one batch element per program.
        blocks = cdiv(channels, cfg["block_s"])
        dw_k = torch.empty((cfg["chunk_programs"], batch, channels, _KINDS, state), dtype=acc_torch, device=x.device)
        dz_k = dz[:blocks]
        gspn_mix_bwd_reg_kernel[(batch * blocks, cfg["chunk_programs"])](
            grad,
            x,
            proxy,
            w[k],
            h,
            dx,
            dz_k,
            dw_k,
            *_strides4(grad),
            *_strides4(x),
            *_strides4(proxy),
            *_strides4(h),
            *_strides4(dx),
            *dz_k.stride(),
            batch,
            channels,
            state,
            num_lines,
            line_length,
            chunk,
            num_chunks,
            blocks,
            VERTICAL=d.vertical,
            REVERSE=d.reverse,
            FIRST=k == 0,
            ACC=acc,
            BLOCK_S=cfg["block_s"],
            BLOCK_J=cfg["block_j"],
            BLOCK_P=cfg["block_p"],
            num_warps=cfg["num_warps"],
        )
        dw.append(dw_k.sum((0, 1)))  # (C, 6, S)
    dw = torch.stack(dw)  # (4, C, 6, S): gradients of the packed weights
    m = merge_weight.to(acc_torch)
    group = channels // gate_channels
    d_gate_weight = dw[:, :, :3].reshape(4, gate_channels, group, 3, state).sum(2).transpose(1, 2)
    d_u_scaled = dw[:, :, 4]
    d_skip_merged = dw[0, :, 5]  # gradient of Σ_k m_k skip_weight[k]
    d_merge = (u_weight * d_u_scaled).sum((1, 2)) + (skip_weight * d_skip_merged).sum((1, 2))
    return [
        dx,
        dz.sum(0),
        d_gate_weight,
        dw[:, :, 3],
        m.view(-1, 1, 1) * d_u_scaled,
        m.view(-1, 1, 1) * d_skip_merged,
        d_merge,
    ]


def mix_backward(scan_module, grad, x, proxy, gate_weight, lam_weight, u_weight, skip_weight, merge_weight, chunk_size):
    """Gradients of :func:`gspn.ops.gspn_mix` (see the module doc).

    The fused kernels when every direction's lines fit one register block; otherwise (and on a GPU
    where they cannot be built) the per-direction recomputation through the line-scan kernels.

    Args:
        scan_module: the Triton line-scan backend module (its ``scan`` and ``scan_backward``).
        grad, x: ``(B, C, H, W)``; proxy: ``(B, S, H, W)``; weights as :func:`mix_forward`'s. All in
            one accumulation dtype (float32 or float64), any strides.
        chunk_size: ``None`` or the tile length.

    Returns:
        ``[dx, dproxy, d_gate_weight, d_lam_weight, d_u_weight, d_skip_weight, d_merge_weight]``.
    """
    args = (grad, x, proxy, gate_weight, lam_weight, u_weight, skip_weight, merge_weight, chunk_size)
    try:
        outs = _fused_backward(*args)
    except Exception as exc:
        if x.device.type != "cuda" or not cannot_build(exc):
            raise
        _broken.update((_REGISTER, next_pow2(n)) for n in x.shape[2:])
        warnings.warn(
            f"gspn: the fused gspn_mix Triton backward cannot be built on this GPU ({type(exc).__name__}: "
            f"{str(exc)[:300]}); recomputing through the line-scan kernels instead",
            RuntimeWarning,
            stacklevel=2,
        )
        outs = None
    if outs is not None:
        return outs
    return _backward_by_scans(scan_module, *args)


def _backward_by_scans(
    scan_module, grad, x, proxy, gate_weight, lam_weight, u_weight, skip_weight, merge_weight, chunk_size
):
    """The backward through the line-scan kernels, one direction at a time (arguments and result as
    :func:`mix_backward`'s; ``dx``/``dproxy`` contiguous NCHW)."""
    grad, x, proxy = (t.contiguous() for t in (grad, x, proxy))  # the scan kernels need dense planes
    channels = x.shape[1]
    gate_channels = gate_weight.shape[2]
    group = channels // gate_channels
    gx = grad * x
    e = torch.einsum("bchw,bshw->cs", gx, proxy)  # Σ_hw (g ⊙ x) proxyᵀ
    skip_merged = torch.einsum("k,kcs->cs", merge_weight, skip_weight)
    d_skip_weight = merge_weight.view(-1, 1, 1) * e
    d_merge = (skip_weight * e).sum((1, 2))
    dproxy = torch.einsum("cs,bchw->bshw", skip_merged, gx)
    del gx
    dx = torch.einsum("cs,bshw->bchw", skip_merged, proxy).mul_(grad)  # (Σ_k m_k D_k) ⊙ g
    d_gate_weight = torch.empty_like(gate_weight)
    d_lam_weight = torch.empty_like(lam_weight)
    d_u_weight = torch.empty_like(u_weight)
    d_merge_u = []
    for k, name in enumerate(DIRECTIONS):
        gates = torch.einsum("gcs,bshw->gbchw", gate_weight[k], proxy)  # (3, B, Cg, H, W)
        lam = torch.einsum("cs,bshw->bchw", lam_weight[k], proxy)
        u = torch.einsum("cs,bshw->bchw", u_weight[k], proxy)
        h = torch.empty_like(x)
        scan_module.scan(
            x, lam, gates[0], gates[1], gates[2], direction=name, chunk_size=chunk_size, normalize=True, out=h
        )
        gu = grad * u
        del u
        d_merge_u.append((gu * h).sum())
        du = (grad * h).mul_(merge_weight[k])  # dL/du_k = m_k g ⊙ h_k
        dh = gu.mul_(merge_weight[k])  # dL/dh_k = m_k g ⊙ u_k
        d_params = [torch.empty_like(x) for _ in range(4)]
        scan_module.scan_backward(
            dh,
            h,
            x,
            lam,
            gates[0],
            gates[1],
            gates[2],
            direction=name,
            chunk_size=chunk_size,
            normalize=True,
            dx=dx,
            accumulate_dx=True,
            d_params=d_params,
        )
        del dh, h, lam, gates
        dlam = d_params[0]
        batch, _, height, width = x.shape
        dgates = torch.stack(d_params[1:]).view(3, batch, gate_channels, group, height, width).sum(3)
        del d_params
        d_gate_weight[k] = torch.einsum("gbchw,bshw->gcs", dgates, proxy)
        d_lam_weight[k] = torch.einsum("bchw,bshw->cs", dlam, proxy)
        d_u_weight[k] = torch.einsum("bchw,bshw->cs", du, proxy)
        dproxy += (
            torch.einsum("gcs,gbchw->bshw", gate_weight[k], dgates)
            + torch.einsum("cs,bchw->bshw", lam_weight[k], dlam)
            + torch.einsum("cs,bchw->bshw", u_weight[k], du)
        )
    d_merge = d_merge + torch.stack(d_merge_u)
    return [dx, dproxy, d_gate_weight, d_lam_weight, d_u_weight, d_skip_weight, d_merge]
