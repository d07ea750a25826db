"""The stability–context condition: the one definition of the gate normalisation.

Given raw logits ``(a_left, a_mid, a_right)`` of a pixel, the propagation weights are

    s_k = sigmoid(a_k)
    w_k = s_k / Σ_{j ∈ V} s_j      for k ∈ V,        w_k = 0 otherwise,

where ``V`` is the set of neighbours that exist: at the first position of the line axis (the axis
perpendicular to the scan) there is no left neighbour, at the last position no right one. The valid
weights are therefore non-negative and sum to exactly 1, which keeps a scan of any length bounded
(``|h| <= max|λ x| · number of lines``) instead of exploding or vanishing.

It is computed as a masked softmax of ``log sigmoid(a)``, which is the same quantity but stays finite
for any logits (a plain ``s / sum(s)`` divides 0 by 0 once all three sigmoids underflow).
The C and Triton kernels evaluate the same formula inline and are tested against this one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .directions import get_direction
from .validation import check_float_tensor


def _valid_masks(size: int, line_dim: int, ndim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks (broadcastable to the gate shape) of positions that have a left / right neighbour."""
    pos = torch.arange(size, device=device)
    shape = [1] * ndim
    shape[line_dim] = size
    return (pos > 0).view(shape), (pos < size - 1).view(shape)


def stabilize(
    w_left: torch.Tensor, w_mid: torch.Tensor, w_right: torch.Tensor, *, direction: str = "tb"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalise raw gate logits so that each pixel's valid weights are ≥ 0 and sum to 1.

    Args:
        w_left, w_mid, w_right: logits ``(..., H, W)`` in the image frame (broadcastable to one shape).
        direction: scan direction; it decides which axis the neighbours lie on
            (W for ``"tb"``/``"bt"``, H for ``"lr"``/``"rl"``).

    Returns:
        The three normalised weights, of the broadcast shape and dtype. Weights of missing neighbours (left at
        position 0, right at the last position of the line) are exactly 0, whatever their logits hold
        (NaN and ±Inf included: such a logit influences no weight and gets gradient 0).

    Raises:
        TypeError: a gate that is not a real floating-point tensor, or a ``direction`` that is not a str.
        ValueError: shapes that do not broadcast, fewer than 2 dims, or an unknown ``direction``.

    Differentiable with ordinary autograd.
    """
    d = get_direction(direction)
    for name, t in (("w_left", w_left), ("w_mid", w_mid), ("w_right", w_right)):
        check_float_tensor(name, t)
    try:
        w_left, w_mid, w_right = torch.broadcast_tensors(w_left, w_mid, w_right)
    except RuntimeError:
        raise ValueError(
            "w_left, w_mid and w_right must have broadcastable shapes, got "
            f"{tuple(w_left.shape)}, {tuple(w_mid.shape)}, {tuple(w_right.shape)}"
        ) from None
    if w_left.ndim < 2:
        raise ValueError(f"w_left must have at least 2 dims (..., H, W), got shape {tuple(w_left.shape)}")
    has_left, has_right = _valid_masks(w_left.shape[d.line_dim], d.line_dim, w_left.ndim, w_left.device)
    # A missing neighbour's logit is not read at all (replaced before logsigmoid): whatever it holds
    # (NaN, ±Inf) its weight is exactly 0, the other weights do not see it, and its gradient is 0.
    logits = torch.stack(
        [
            F.logsigmoid(torch.where(has_left, w_left, 0.0)).masked_fill(~has_left, float("-inf")),
            F.logsigmoid(w_mid),
            F.logsigmoid(torch.where(has_right, w_right, 0.0)).masked_fill(~has_right, float("-inf")),
        ]
    )
    weights = torch.softmax(logits, dim=0)
    return weights[0], weights[1], weights[2]


def stabilize_vjp(
    grad_left: torch.Tensor,
    grad_mid: torch.Tensor,
    grad_right: torch.Tensor,
    logits: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vector-Jacobian product of :func:`stabilize`: gradients w.r.t. the logits.

    With ``w = stabilize(a)`` and upstream ``g = dL/dw``:
    ``dL/da_k = w_k (1 - sigmoid(a_k)) (g_k - Σ_j g_j w_j)`` (zero for missing neighbours, whose
    ``w_k`` is 0). ``weights`` must be the output of :func:`stabilize` for ``logits``.
    """
    grads = (grad_left, grad_mid, grad_right)
    dot = sum(g * w for g, w in zip(grads, weights, strict=True))
    return tuple(  # type: ignore[return-value]
        w * torch.sigmoid(-a) * (g - dot) for g, a, w in zip(grads, logits, weights, strict=True)
    )
