"""Attention baselines at layer level: multi-head softmax self-attention and linear attention.

The one implementation of the attention layers that GSPN is compared with: the benchmark's timed
methods (:mod:`gspn.bench.methods`), the attention DiT of ``benchmarks/dit_sampling.py`` and the ViT
baseline classifier (:class:`gspn.models.baselines.ViTBaseline`) all use these modules.

Both layers share one layout (that of timm's ``Attention``): a fused ``qkv`` ``nn.Linear(C, 3·C)``
whose output is read as ``(3, heads, C / heads)`` per token (q rows first, head-major inside each), the
attention per head, the heads concatenated back and an output ``proj`` ``nn.Linear(C, C)``.

Only torch is imported here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LinearAttention", "MultiHeadSelfAttention", "linear_attention"]


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    r"""Non-causal linear attention with the ``φ(x) = elu(x) + 1`` feature map.

    .. math::
        o_i = \frac{φ(q_i)^T \sum_j φ(k_j) v_j^T}{φ(q_i)^T \sum_j φ(k_j) + ε}

    computed right-to-left in ``O(N·d·e)`` time and ``O(N·(d + e) + d·e)`` memory (Katharopoulos et al.,
    "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention", ICML 2020, eq. 5-7).

    Args:
        q, k: ``(..., N, d)`` floating tensors; v: ``(..., N, e)``, same leading dimensions and dtype.
        eps: added to the normaliser (which is positive: ``φ > 0``).

    Returns:
        ``(..., N, e)``, dtype of the inputs.
    """
    q = F.elu(q) + 1
    k = F.elu(k) + 1
    kv = k.transpose(-2, -1) @ v  # (..., d, e)
    normaliser = q @ k.sum(dim=-2).unsqueeze(-1)  # (..., N, 1)
    return (q @ kv) / (normaliser + eps)


class _ProjectedAttention(nn.Module):
    """Fused q/k/v projection → :meth:`attend` per head → output projection, on ``(B, *S, C)`` tokens."""

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if not isinstance(num_heads, int) or num_heads <= 0:
            raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}")
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        if not 0.0 <= proj_drop < 1.0:
            raise ValueError(f"proj_drop must be in [0, 1), got {proj_drop!r}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``(B, heads, N, head_dim)`` each → ``(B, heads, N, head_dim)``."""
        raise NotImplementedError

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project tokens ``(B, N, C)`` to ``q, k, v``, each ``(B, heads, N, head_dim)``."""
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attention over all positions of ``x``.

        Args:
            x: ``(B, N, C)`` tokens or a channels-last map ``(B, H, W, C)`` (any ``(B, *S, C)``: the
                positions ``S`` are flattened to ``N = prod(S)`` tokens), ``C == dim``, floating dtype
                of the parameters.

        Returns:
            The same shape and dtype as ``x``.

        Raises:
            ValueError: ``x`` has fewer than 3 dimensions or its last dimension is not ``dim``.
        """
        if x.dim() < 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, N, {self.dim}) or (B, H, W, {self.dim}), got {tuple(x.shape)}")
        shape = x.shape
        tokens = x.reshape(shape[0], -1, self.dim)
        out = self.attend(*self.split_heads(tokens))  # (B, heads, N, head_dim)
        out = out.transpose(1, 2).reshape(tokens.shape)
        return self.proj_drop(self.proj(out)).reshape(shape)


class MultiHeadSelfAttention(_ProjectedAttention):
    r"""Multi-head softmax self-attention (Vaswani et al., "Attention Is All You Need", NeurIPS 2017).

    Per head ``h`` with ``q_h, k_h, v_h = x W_{q,h}, x W_{k,h}, x W_{v,h}`` (rows of the fused ``qkv``
    projection) and ``d = C / num_heads``:

    .. math::
        \mathrm{head}_h = \mathrm{softmax}\!\left(\frac{q_h k_h^T}{\sqrt{d}}\right) v_h, \qquad
        y = [\mathrm{head}_1, …, \mathrm{head}_{heads}]\, W_o + b_o

    computed with :func:`torch.nn.functional.scaled_dot_product_attention` (no mask: every position
    attends to every other, ``O(N²·C)`` time). Parameters: ``qkv`` (``nn.Linear(C, 3·C)``) and ``proj``
    (``nn.Linear(C, C)``), the names and layout of timm's ``Attention``.

    Args:
        dim: token width ``C``, divisible by ``num_heads``.
        num_heads: number of heads.
        qkv_bias: bias in the ``qkv`` projection.
        attn_drop: dropout probability on the attention weights (training mode only).
        proj_drop: dropout probability after the output projection.
        proj_bias: bias in the output projection.

    Shapes: ``(B, N, C) → (B, N, C)``, or ``(B, H, W, C) → (B, H, W, C)`` (all ``H·W`` positions attend to
    each other).

    Raises:
        ValueError: ``dim`` or ``num_heads`` not a positive integer, ``dim`` not divisible by
            ``num_heads``, or a dropout probability outside ``[0, 1)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        proj_bias: bool = True,
    ) -> None:
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, proj_drop=proj_drop)
        if not 0.0 <= attn_drop < 1.0:
            raise ValueError(f"attn_drop must be in [0, 1), got {attn_drop!r}")
        self.attn_drop = attn_drop

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``softmax(q kᵀ / √d) v`` per head: ``(B, heads, N, d)`` each → ``(B, heads, N, d)``."""
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, attn_drop={self.attn_drop}"


class LinearAttention(_ProjectedAttention):
    """Multi-head linear attention: :func:`linear_attention` per head with the ``qkv``/``proj`` projections
    of :class:`MultiHeadSelfAttention` (``O(N·C²/heads)`` time instead of ``O(N²·C)``).

    Args:
        dim: token width ``C``, divisible by ``num_heads``.
        num_heads: number of heads.
        qkv_bias: bias in the ``qkv`` projection.
        eps: added to the normaliser of :func:`linear_attention`.
        proj_drop: dropout probability after the output projection.
        proj_bias: bias in the output projection.

    Shapes: ``(B, N, C) → (B, N, C)``, or ``(B, H, W, C) → (B, H, W, C)``.

    Raises:
        ValueError: as :class:`MultiHeadSelfAttention`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        eps: float = 1e-6,
        proj_drop: float = 0.0,
        proj_bias: bool = True,
    ) -> None:
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, proj_drop=proj_drop)
        self.eps = eps

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """:func:`linear_attention` per head: ``(B, heads, N, d)`` each → ``(B, heads, N, d)``."""
        return linear_attention(q, k, v, self.eps)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, eps={self.eps}"
