"""Derivative of the line scan's backward: what makes double backward (``create_graph=True``) exact.

``gspn::line_scan_backward`` maps ``(g, h, x, λ, θ)`` — the output gradient, the forward output, the
input, λ and the three gates (logits if ``normalize``) — to

    a    = Sᵀ g                       (the adjoint scan; S is the forward scan with gates W)
    dx   = λ a,    dλ = x a,
    dW_k = a ⊙ E_k h                  ((E_k h)[l, p] = h[l-1, p+k-1] where gate k is used, else 0)
    dθ   = J_Nᵀ dW                    (J_N: Jacobian of the normalisation W = N(θ); identity if raw)

in the line frame of a direction (k = 0, 1, 2: left, mid, right). Given cotangents
``(cx, cλ, cθ)`` of ``(dx, dλ, dθ)``, with ``cW = J_N cθ`` and
``r = λ cx + x cλ + Σ_k cW_k ⊙ E_k h``, the pairing ``<cx, dx> + <cλ, dλ> + <cθ, dθ>`` equals
``<a, r> = <Sᵀ g, r> = <g, S r>``, so with ``v = S r`` (one *forward* scan of r):

    ∂g = v
    ∂x = cλ a,    ∂λ = cx a,    ∂h = Σ_k E_kᵀ (cW_k ⊙ a)
    ∂θ = J_Nᵀ (a ⊙ E_k v)  +  ∇_θ <cθ, J_N(θ)ᵀ dW> |_{dW fixed}

The first part of ``∂θ`` (and ``a`` itself) is exactly what the backward operator computes for the
gradient ``g``, the "output" ``v``, the input ``r`` and ``λ = 1``; the second is pointwise (the
second derivative of the normalisation, written out below). So the derivative of the backward is one
forward scan plus one backward scan, both through the ``gspn::`` operators — which are themselves
differentiable, so every order of derivative works. Unused gates (see :func:`used_gate_masks`) stay
inert here too: their entries are masked before and after.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .directions import DIRECTIONS, from_line_frame, to_line_frame, used_gate_masks
from .stabilize import stabilize
from .validation import compute_dtype, expand_channels, reduce_to_shape, result_dtype


def _full(t: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
    """A parameter broadcast to the full ``(B, C, H, W)`` shape (channel groups, batch 1)."""
    return expand_channels(t.to(dtype), shape[1]).expand(shape)


def _previous_line(h: torch.Tensor, direction: str, masks) -> list[torch.Tensor]:
    """``E_k h`` for k = left, mid, right: the neighbours on the previous line, 0 where gate k is unused."""
    prev = F.pad(to_line_frame(h, direction)[..., :-1, :], (0, 0, 1, 0))  # line l gets line l - 1
    shifted = (F.pad(prev[..., :-1], (1, 0)), prev, F.pad(prev[..., 1:], (0, 1)))  # p-1, p, p+1
    return [torch.where(m, from_line_frame(s, direction), 0.0) for m, s in zip(masks, shifted, strict=True)]


def _previous_line_adjoint(ys, direction: str, masks) -> torch.Tensor:
    """``Σ_k E_kᵀ y_k``: each y_k[l, p] goes back to the neighbour it weighted on line l - 1."""
    y_l, y_m, y_r = (to_line_frame(torch.where(m, y, 0.0), direction) for m, y in zip(masks, ys, strict=True))
    total = F.pad(y_l[..., 1:], (0, 1)) + y_m + F.pad(y_r[..., :-1], (1, 0))  # to positions p-1, p, p+1
    return from_line_frame(F.pad(total[..., 1:, :], (0, 0, 0, 1)), direction)  # to line l - 1


def backward_vjp(grad, h, x, params, cotangents, direction: str, chunk_size, normalize: bool, backend: str):
    """Vector-Jacobian product of ``gspn::line_scan_backward`` (one direction).

    Args:
        grad, h, x: ``(B, C, H, W)``; params: ``(lam, w_left, w_mid, w_right)`` in their broadcast
            shapes; cotangents: of the backward's outputs ``(dx, dlam, dw_left, dw_mid, dw_right)``,
            each of its input's shape, or ``None`` for zero.

    Returns:
        The gradients of ``(grad, h, x, lam, w_left, w_mid, w_right)``, each of its input's shape and
        dtype.
    """
    lam, *logits = params
    inputs = (grad, h, x, *params)
    if any(t.numel() == 0 for t in (grad, h, x)):
        return [torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in inputs]
    dtype = compute_dtype(result_dtype(*inputs))
    shape = x.shape
    height, width = shape[-2:]
    masks = used_gate_masks(height, width, direction, chunk_size, x.device)
    c_x, c_lam, *c_logits = (None if c is None else c.to(dtype) for c in cotangents)

    # Cotangents of the gate gradients: masked (those gradients are 0 by rule), then c_w = J_N c_θ.
    c_theta = [
        torch.where(m, _full(c, shape, dtype), 0.0)
        if c is not None
        else torch.zeros(shape, dtype=dtype, device=x.device)
        for m, c in zip(masks, c_logits, strict=True)
    ]
    if normalize:
        theta = [torch.where(m, _full(t, shape, dtype), 0.0) for m, t in zip(masks, logits, strict=True)]
        weights = [w.expand(shape) for w in stabilize(*theta, direction=direction)]
        sig = [torch.sigmoid(t) for t in theta]
        u = [torch.sigmoid(-t) * c for t, c in zip(theta, c_theta, strict=True)]  # (1 - s_k) c_θk
        u_bar = sum(w * uk for w, uk in zip(weights, u, strict=True))
        c_w = [w * (uk - u_bar) for w, uk in zip(weights, u, strict=True)]
    else:
        c_w = c_theta

    h_prev = _previous_line(h.to(dtype), direction, masks)
    r = sum(c * e for c, e in zip(c_w, h_prev, strict=True))
    if c_x is not None:
        r = r + _full(lam, shape, dtype) * c_x
    if c_lam is not None:
        r = r + x.to(dtype) * _full(c_lam, shape, dtype)
    ones = x.new_ones((1, 1, height, width), dtype=dtype)
    v = torch.ops.gspn.line_scan(r, ones, *logits, direction, chunk_size, normalize, backend)
    # The backward operator for (g, output v, input r, λ = 1): a = Sᵀ g and J_Nᵀ (a ⊙ E_k v).
    a, _, *d_logits = torch.ops.gspn.line_scan_backward(
        grad, v, r, ones, *logits, direction, chunk_size, normalize, backend
    )

    d_x = a * _full(c_lam, shape, dtype) if c_lam is not None else torch.zeros_like(a)
    d_lam = reduce_to_shape(a * c_x, lam.shape) if c_x is not None else a.new_zeros(lam.shape)
    d_h = _previous_line_adjoint([c * a for c in c_w], direction, masks)
    if normalize:
        # ∇_θ <c_θ, J_N(θ)ᵀ dW> with dW_k = a ⊙ E_k h fixed; with D = Σ w_j dW_j, U = Σ w_j u_j,
        # Q = Σ w_j u_j dW_j, for each k:  (1 - s_k) w_k [(u_k - U - c_θk s_k)(dW_k - D) - Q + U D].
        d_w = [a * e for e in h_prev]
        dot = sum(w * d for w, d in zip(weights, d_w, strict=True))
        q = sum(w * uk * d for w, uk, d in zip(weights, u, d_w, strict=True))
        for k in range(3):
            second = (
                torch.sigmoid(-theta[k])
                * weights[k]
                * ((u[k] - u_bar - c_theta[k] * sig[k]) * (d_w[k] - dot) - q + u_bar * dot)
            )
            second = torch.where(masks[k], second, 0.0)
            d_logits[k] = d_logits[k] + reduce_to_shape(second, logits[k].shape).to(d_logits[k].dtype)
    results = (v, d_h, d_x, d_lam, *d_logits)
    return [g.to(t.dtype) for g, t in zip(results, inputs, strict=True)]


def backward_4d_vjp(grad, h, x, params, cotangents, chunk_size, normalize: bool, backend: str):
    """Vector-Jacobian product of ``gspn::line_scan_4d_backward``: :func:`backward_vjp` per direction.

    ``grad``, ``h``: ``(B, 4, C, H, W)``; params and their cotangents: ``(B|1, 4|1, C|Cg, H, W)``;
    ``cotangents[0]`` (of dx) is ``(B, C, H, W)``. Returns the gradients of
    ``(grad, h, x, lam, w_left, w_mid, w_right)``.
    """
    c_x, *c_params = cotangents
    per_direction = []
    for k, direction in enumerate(DIRECTIONS):
        step_params = [p[:, k if p.shape[1] == 4 else 0] for p in params]
        step_cot = [None if c is None else c[:, k if c.shape[1] == 4 else 0] for c in c_params]
        per_direction.append(
            backward_vjp(
                grad[:, k], h[:, k], x, step_params, (c_x, *step_cot), direction, chunk_size, normalize, backend
            )
        )
    d_grad, d_h, d_x, *d_params = zip(*per_direction, strict=True)
    out = [torch.stack(d_grad, dim=1), torch.stack(d_h, dim=1), sum(d_x)]
    for grads, p in zip(d_params, params, strict=True):
        out.append(torch.stack(grads, dim=1) if p.shape[1] == 4 else sum(grads).unsqueeze(1))
    return out
