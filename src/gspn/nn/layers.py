"""Small building blocks shared by the GSPN layers and backbones (no timm dependency).

* :class:`LayerNorm2d` — LayerNorm over the channel axis of a ``(B, C, H, W)`` map.
* :class:`GRN` — ConvNeXt-V2 Global Response Normalization on channels-last ``(B, H, W, C)``.
* :class:`DropPath` — stochastic depth (drops the whole residual branch per sample).
* :class:`Mlp` — the two-layer feed-forward network of a transformer block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GRN", "DropPath", "LayerNorm2d", "Mlp", "drop_path"]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of a channels-first map.

    ``y[b, :, h, w] = (x[b, :, h, w] − μ) / sqrt(σ² + eps) · weight + bias``, with μ and σ² taken
    over the ``C`` channels of each pixel.

    Shapes: ``(B, C, H, W) → (B, C, H, W)``.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global Response Normalization (ConvNeXt-V2) on channels-last maps.

    For each sample and channel ``c``::

        G_c = ‖x[:, :, c]‖₂ over (H, W)
        N_c = G_c / (mean_c' G_c' + eps)
        y   = γ ⊙ (x ⊙ N) + β + x

    ``γ`` and ``β`` start at zero, so the layer is the identity at initialisation.

    Shapes: ``(B, H, W, C) → (B, H, W, C)``.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + self.eps)
        return torch.addcmul(self.beta + x, self.gamma, x * nx)


def drop_path(
    x: torch.Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True
) -> torch.Tensor:
    """Zero each sample of ``x`` (dim 0) with probability ``drop_prob``; keep the expectation.

    ``y_b = x_b · m_b / (1 − p)`` with ``m_b ~ Bernoulli(1 − p)`` when ``training``; identity otherwise.
    """
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    if scale_by_keep and keep > 0.0:
        mask.div_(keep)
    return x * mask


class DropPath(nn.Module):
    """Stochastic depth for the residual branch: see :func:`drop_path`. Any shape ``(B, ...)``."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Mlp(nn.Module):
    """Feed-forward network ``fc2(drop(act(fc1(x))))`` on the last axis.

    Shapes: ``(..., dim) → (..., out_dim or dim)``; the hidden width is ``hidden_dim``.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        out_dim: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act_layer()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))
