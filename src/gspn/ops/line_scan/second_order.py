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

from .._library import compute_dtype, result_dtype
from ..directions import DIRECTIONS, from_line_frame, to_line_frame, used_gate_masks
from ..stabilize import stabilize
from ..validation import expand_channels, reduce_to_shape


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


def _tangent_input(h, x, params, tangents, masks, direction: str, normalize: bool, dtype):
    """``r = λ ṫx + x ṫλ + Σ_k ṫW_k ⊙ E_k h`` with ``ṫW = J_N ṫθ`` (``ṫθ`` if not ``normalize``).

    ``tangents``: ``(ṫx, ṫλ, ṫθ_left, ṫθ_mid, ṫθ_right)``, each of its input's (broadcast) shape or
    ``None`` for zero. Returns ``r`` (``None`` if every tangent is ``None``), the masked gate
    tangents ``ṫθ``, ``ṫW`` and, with ``normalize``, ``(θ, W, σ(θ), u, ū)`` for the second derivative.
    """
    lam, *logits = params
    t_x, t_lam, *t_logits = (None if t is None else t.to(dtype) for t in tangents)
    shape = x.shape
    zeros = torch.zeros(shape, dtype=dtype, device=x.device)
    c_theta = [
        zeros if c is None else torch.where(m, _full(c, shape, dtype), 0.0)
        for m, c in zip(masks, t_logits, strict=True)
    ]
    extras = None
    if normalize:
        theta = [torch.where(m, _full(t, shape, dtype), 0.0) for m, t in zip(masks, logits, strict=True)]
        weights = [w.expand(shape) for w in stabilize(*theta, direction=direction)]
        sig = [torch.sigmoid(t) for t in theta]
        u = [torch.sigmoid(-t) * c for t, c in zip(theta, c_theta, strict=True)]  # (1 - s_k) c_θk
        u_bar = sum(w * uk for w, uk in zip(weights, u, strict=True))
        c_w = [w * (uk - u_bar) for w, uk in zip(weights, u, strict=True)]
        extras = (theta, weights, sig, u, u_bar)
    else:
        c_w = c_theta
    r = None
    if any(t is not None for t in t_logits):
        h_prev = _previous_line(h.to(dtype), direction, masks)
        r = sum(c * e for c, e in zip(c_w, h_prev, strict=True))
    if t_x is not None:
        r = _full(lam, shape, dtype) * t_x if r is None else r + _full(lam, shape, dtype) * t_x
    if t_lam is not None:
        r = x.to(dtype) * _full(t_lam, shape, dtype) if r is None else r + x.to(dtype) * _full(t_lam, shape, dtype)
    return r, c_theta, c_w, extras


def scan_jvp(h, x, params, tangents, direction: str, chunk_size, normalize: bool, backend: str, *, scan):
    """Jacobian-vector product of ``gspn::line_scan``: the tangent of ``h = S_W(λ x)``.

    The scan is linear in its state, so the tangent obeys the same recurrence with the input
    ``r = λ ṫx + x ṫλ + Σ_k ṫW_k ⊙ E_k h`` (``ṫW = J_N ṫθ``, the normalisation's Jacobian applied to the
    logits' tangents): ``ṫh = S_W r``, one more forward scan with ``λ = 1``, through ``scan``
    (``line_scan``'s signature, positional options), so it is itself differentiable.

    Args:
        h: the forward output ``(B, C, H, W)``; x, params: the forward inputs; tangents: of
            ``(x, lam, w_left, w_mid, w_right)``, ``None`` for zero.

    Returns:
        ``ṫh`` of ``h``'s shape and dtype.
    """
    if h.numel() == 0:
        return torch.zeros(h.shape, dtype=h.dtype, device=h.device)
    dtype = compute_dtype(result_dtype(h, x, *params))
    height, width = x.shape[-2:]
    masks = used_gate_masks(height, width, direction, chunk_size, x.device)
    r, *_ = _tangent_input(h, x, params, tangents, masks, direction, normalize, dtype)
    if r is None:
        return torch.zeros(h.shape, dtype=h.dtype, device=h.device)
    ones = x.new_ones((1, 1, height, width), dtype=dtype)
    return scan(r, ones, *params[1:], direction, chunk_size, normalize, backend).to(h.dtype)


def scan_4d_jvp(h, x, params, tangents, chunk_size, normalize: bool, backend: str, *, scan):
    """Jacobian-vector product of ``gspn::line_scan_4d``: :func:`scan_jvp` per direction, stacked.

    ``h``: ``(B, 4, C, H, W)``; params and their tangents ``(B|1, 4|1, C|Cg, H, W)`` (``None``: zero);
    ``tangents[0]`` (of x) ``(B, C, H, W)``.
    """
    t_x, *t_params = tangents
    out = []
    for k, direction in enumerate(DIRECTIONS):
        step = [p[:, k if p.shape[1] == 4 else 0] for p in params]
        step_t = [None if t is None else t[:, k if t.shape[1] == 4 else 0] for t in t_params]
        out.append(scan_jvp(h[:, k], x, step, (t_x, *step_t), direction, chunk_size, normalize, backend, scan=scan))
    return torch.stack(out, dim=1)


def backward_vjp(
    grad, h, x, params, cotangents, direction: str, chunk_size, normalize: bool, backend: str, *, scan, scan_backward
):
    """Vector-Jacobian product of ``gspn::line_scan_backward`` (one direction).

    Args:
        grad, h, x: ``(B, C, H, W)``; params: ``(lam, w_left, w_mid, w_right)`` in their broadcast
            shapes; cotangents: of the backward's outputs ``(dx, dlam, dw_left, dw_mid, dw_right)``,
            each of its input's shape, or ``None`` for zero; scan, scan_backward: the operators to
            call (``line_scan`` and ``line_scan_backward`` with positional options).

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
    c_x, c_lam = (None if c is None else c.to(dtype) for c in cotangents[:2])
    r, c_theta, c_w, extras = _tangent_input(h, x, params, cotangents, masks, direction, normalize, dtype)
    if r is None:
        r = torch.zeros(shape, dtype=dtype, device=x.device)
    h_prev = _previous_line(h.to(dtype), direction, masks)
    ones = x.new_ones((1, 1, height, width), dtype=dtype)
    v = scan(r, ones, *logits, direction, chunk_size, normalize, backend)
    # The backward operator for (g, output v, input r, λ = 1): a = Sᵀ g and J_Nᵀ (a ⊙ E_k v).
    a, _, *d_logits = scan_backward(grad, v, r, ones, *logits, direction, chunk_size, normalize, backend)

    d_x = a * _full(c_lam, shape, dtype) if c_lam is not None else torch.zeros_like(a)
    d_lam = reduce_to_shape(a * c_x, lam.shape) if c_x is not None else a.new_zeros(lam.shape)
    d_h = _previous_line_adjoint([c * a for c in c_w], direction, masks)
    if normalize:
        # ∇_θ <c_θ, J_N(θ)ᵀ dW> with dW_k = a ⊙ E_k h fixed; with D = Σ w_j dW_j, U = Σ w_j u_j,
        # Q = Σ w_j u_j dW_j, for each k:  (1 - s_k) w_k [(u_k - U - c_θk s_k)(dW_k - D) - Q + U D].
        theta, weights, sig, u, u_bar = extras
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


def backward_4d_vjp(grad, h, x, params, cotangents, chunk_size, normalize: bool, backend: str, **ops):
    """Vector-Jacobian product of ``gspn::line_scan_4d_backward``: :func:`backward_vjp` per direction.

    ``grad``, ``h``: ``(B, 4, C, H, W)``; params and their cotangents: ``(B|1, 4|1, C|Cg, H, W)``;
    ``cotangents[0]`` (of dx) is ``(B, C, H, W)``. Returns the gradients of
    ``(grad, h, x, lam, w_left, w_mid, w_right)``; ``ops``: ``scan`` and ``scan_backward`` as there.
    """
    c_x, *c_params = cotangents
    per_direction = []
    for k, direction in enumerate(DIRECTIONS):
        step_params = [p[:, k if p.shape[1] == 4 else 0] for p in params]
        step_cot = [None if c is None else c[:, k if c.shape[1] == 4 else 0] for c in c_params]
        per_direction.append(
            backward_vjp(
                grad[:, k], h[:, k], x, step_params, (c_x, *step_cot), direction, chunk_size, normalize, backend, **ops
            )
        )
    d_grad, d_h, d_x, *d_params = zip(*per_direction, strict=True)
    out = [torch.stack(d_grad, dim=1), torch.stack(d_h, dim=1), sum(d_x)]
    for grads, p in zip(d_params, params, strict=True):
        out.append(torch.stack(grads, dim=1) if p.shape[1] == 4 else sum(grads).unsqueeze(1))
    return out
