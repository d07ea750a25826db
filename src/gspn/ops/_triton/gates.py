"""``@triton.jit`` helpers of both operators' kernels (the line scan's and the fused layer's), imported
with triton by the kernel modules only: the gate normalisation and the ``p ± 1`` neighbours of a line.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def stabilize_logits(al, am, ar, has_l, has_r):
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
def forward_gates(al, am, ar, has_l, has_r, NORMALIZE: tl.constexpr):
    """The gates the forward recurrence uses: the loaded values, or normalised logits.

    A missing neighbour's gate is replaced by 0 before anything reads it (0·NaN would be NaN), so
    whatever it holds never reaches a result; gates of a line that starts a tile are loaded as 0.
    """
    al = tl.where(has_l, al, 0.0)
    ar = tl.where(has_r, ar, 0.0)
    if NORMALIZE:
        al, am, ar, _cl, _cm, _cr = stabilize_logits(al, am, ar, has_l, has_r)
    return al, am, ar


@triton.jit
def load_neighbours(mid, step, m, has_l, has_r, ACC: tl.constexpr):
    """``(mid[-step], mid[0], mid[+step])`` of a pointer block under ``m`` and the existence of the
    left/right neighbours, as ACC (0 where masked off)."""
    left = tl.load(mid - step, mask=m & has_l, other=0.0).to(ACC)
    centre = tl.load(mid, mask=m, other=0.0).to(ACC)
    right = tl.load(mid + step, mask=m & has_r, other=0.0).to(ACC)
    return left, centre, right


@triton.jit
def neighbours(left_src, right_src, idx_left, idx_right, has_left, has_right):
    """``(left_src[..., p-1], right_src[..., p+1])`` (zero past the ends) with a single gather."""
    both = tl.gather(tl.join(left_src, right_src), tl.join(idx_left, idx_right), axis=1)
    from_left, from_right = tl.split(both)
    return tl.where(has_left, from_left, 0.0), tl.where(has_right, from_right, 0.0)
