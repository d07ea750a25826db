"""The GSPN classification block (pre-norm residual mixer + MLP)."""

from __future__ import annotations

import torch
from torch import nn

from .layers import DropPath, Mlp
from .mixer import GSPNMixer

__all__ = ["GSPNBlock"]


class GSPNBlock(nn.Module):
    r"""Pre-norm residual block with a GSPN mixer and an MLP::

        x = x + DropPath(GSPNMixer(LN(x)))
        x = x + DropPath(MLP(LN(x)))          MLP: Linear(D → r·D) → GELU → Linear(r·D → D)

    Args:
        dim: width ``D``.
        mlp_ratio: MLP expansion ``r`` (4).
        drop_path: stochastic-depth probability of both branches.
        norm_eps: LayerNorm epsilon.
        **mixer_kwargs: forwarded to :class:`GSPNMixer` (``d_state``, ``expand``, ``kernel_size``,
            ``chunk_size``, ``gate_channels``, ``backend``, ``conv_act``, ``merge_frame``, ``fused``,
            ``propagation_channels``).

    Shapes: channels-last ``(B, H, W, D) → (B, H, W, D)``.
    """

    def __init__(
        self,
        dim: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        **mixer_kwargs,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.mixer = GSPNMixer(dim, norm_eps=norm_eps, **mixer_kwargs)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, round(mlp_ratio * dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, H, W, D) → (B, H, W, D)``."""
        x = x + self.drop_path(self.mixer(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))
