"""GSPN token mixers: the classification mixer on maps and the self-attention drop-in on tokens."""

from __future__ import annotations

import math

import torch
from torch import nn

from .gspn2d import GSPN2d
from .layers import GRN

__all__ = ["GSPNAttention", "GSPNMixer", "resolve_hw"]


class GSPNMixer(nn.Module):
    r"""The GSPN mixer of the classification block, on channels-last maps.

    ::

        x → Linear(dim → d_inner) → depthwise k×k conv → SiLU (if conv_act) → GSPN2d
          → LayerNorm(d_inner) → GRN(d_inner) → Linear(d_inner → dim)

    with ``d_inner = round(expand · dim)``. The linears and the depthwise conv have no bias
    (the reference layout; parameter counts of GSPN-T/S/B depend on it).

    Args:
        dim: model width ``D``.
        d_state: proxy dimension of :class:`GSPN2d`.
        expand: ``d_inner / dim`` (1.5 in the GSPN backbones).
        kernel_size: depthwise conv size (7); ``0`` removes the conv.
        chunk_size: ``None`` (global) or the local tile size, see :class:`GSPN2d`.
        gate_channels: gate sharing of :class:`GSPN2d` (``None`` = per channel).
        norm_eps: epsilon of the output LayerNorm.
        backend: scan backend.
        conv_act: apply SiLU after the depthwise conv (default). The reference code builds that
            SiLU but never calls it: ``False`` reproduces it (used for the authors' checkpoints).
        merge_frame: :class:`GSPN2d`'s merge (``"image"``, aligned; ``"scan"``, the reference's).
        fused: run :class:`GSPN2d` as the fused operator :func:`gspn.ops.gspn_mix` (default) or as
            the materialising composition (``False``; same parameters and numbers).
        propagation_channels: compact channel propagation of :class:`GSPN2d` (``None`` = off,
            propagate all ``d_inner`` channels; an int ``Cp``: propagate in a ``Cp``-channel proxy
            space with shared gates).

    Shapes: ``(B, H, W, D) → (B, H, W, D)``.
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 8,
        expand: float = 1.5,
        kernel_size: int = 7,
        chunk_size: int | None = None,
        gate_channels: int | None = None,
        norm_eps: float = 1e-6,
        backend: str = "auto",
        conv_act: bool = True,
        merge_frame: str = "image",
        fused: bool = True,
        propagation_channels: int | None = None,
    ) -> None:
        super().__init__()
        d_inner = round(expand * dim)
        self.dim = dim
        self.d_inner = d_inner
        self.in_proj = nn.Linear(dim, d_inner, bias=False)
        self.conv = (
            nn.Conv2d(d_inner, d_inner, kernel_size, padding=kernel_size // 2, groups=d_inner, bias=False)
            if kernel_size
            else nn.Identity()
        )
        self.act = nn.SiLU() if conv_act else nn.Identity()
        self.gspn = GSPN2d(
            d_inner,
            d_state=d_state,
            chunk_size=chunk_size,
            gate_channels=gate_channels,
            backend=backend,
            merge_frame=merge_frame,
            fused=fused,
            propagation_channels=propagation_channels,
        )
        self.out_norm = nn.LayerNorm(d_inner, eps=norm_eps)
        self.grn = GRN(d_inner)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, H, W, D) → (B, H, W, D)``."""
        x = self.in_proj(x).permute(0, 3, 1, 2)
        x = self.gspn(self.act(self.conv(x))).permute(0, 2, 3, 1)
        return self.out_proj(self.grn(self.out_norm(x)))


def resolve_hw(num_tokens: int, hw: tuple[int, int] | None) -> tuple[int, int]:
    """The ``(H, W)`` grid of ``num_tokens`` tokens in row-major order.

    ``hw`` is checked (``H·W == num_tokens``); when it is ``None`` the grid is inferred only if
    ``num_tokens`` is a perfect square, otherwise a ``ValueError`` asks for an explicit ``hw``
    (a non-square grid cannot be guessed from the token count).
    """
    if hw is None:
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(
                f"cannot infer the token grid: {num_tokens} tokens is not a perfect square; pass hw=(H, W) explicitly"
            )
        return side, side
    height, width = (int(v) for v in hw)
    if height * width != num_tokens:
        raise ValueError(f"hw={tuple(hw)} has {height * width} positions but the input has {num_tokens} tokens")
    return height, width


class GSPNAttention(GSPNMixer):
    r"""GSPN as a drop-in replacement for self-attention on a token sequence.

    The tokens are laid out row-major on an ``(H, W)`` grid, mixed by :class:`GSPNMixer` and
    flattened back. Cost is linear in the number of tokens, with no positional embedding.

    Args:
        dim: token width ``D``.
        hw: default grid ``(H, W)``; may be given per call instead. If neither is given the grid
            is inferred for a square number of tokens only.
        **kwargs: as :class:`GSPNMixer` (``d_state``, ``expand``, ``kernel_size``, ``chunk_size``, ...).

    Shapes: ``(B, T, D) → (B, T, D)`` with ``T = H·W``.

    Example:
        >>> import torch
        >>> from gspn.nn import GSPNAttention
        >>> attn = GSPNAttention(32, d_state=4)
        >>> attn(torch.randn(2, 6 * 10, 32), hw=(6, 10)).shape
        torch.Size([2, 60, 32])
    """

    def __init__(self, dim: int, hw: tuple[int, int] | None = None, **kwargs) -> None:
        super().__init__(dim, **kwargs)
        self.hw = hw

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:  # type: ignore[override]
        """``x: (B, T, D) → (B, T, D)``; ``hw`` overrides the grid given at construction."""
        if x.ndim != 3:
            raise ValueError(f"GSPNAttention expects tokens (B, T, D), got shape {tuple(x.shape)}")
        b, t, d = x.shape
        height, width = resolve_hw(t, hw if hw is not None else self.hw)
        return super().forward(x.reshape(b, height, width, d)).reshape(b, t, d)
