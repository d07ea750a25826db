"""Isotropic attention ViTs (``vit_*``): the default teachers of ``gspn distill-encoder``.

A plain pre-norm Vision Transformer whose blocks align one-to-one with the ``gspn_vit_*`` encoders
(:mod:`gspn.models.gspn_vit`): the same patch embedding (zero-pad to a multiple of ``p``, conv
``p×p`` stride ``p``), the same depth, width, MLP and patch per size, the same head (LN → mean pool
→ Linear) and the same token layout, so block ``i`` of ``vit_nano`` and block ``i`` of
``gspn_vit_nano`` map ``(B, D, h, w)`` to ``(B, D, h, w)`` on the same token grid::

    patch embed: pad to a multiple of p → conv p×p stride p (in_chans → D)     (⌈H/p⌉ × ⌈W/p⌉ tokens)
    + position:  learned (interpolated bicubically — or bilinearly — to the token grid), 2-D sin-cos, or none
    depth ×      x + DropPath(MultiHeadSelfAttention(LN x)),  x + DropPath(MLP(LN x))
    head:        LN → global average pool → dropout → Linear

Attention is the library's one implementation, :class:`gspn.nn.MultiHeadSelfAttention` (fused
``qkv``, :func:`torch.nn.functional.scaled_dot_product_attention`). The block is the standard pre-norm
transformer block (Vaswani et al. 2017; Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR
2021). **Ours:** no class token (mean pooling, as the GSPN encoders, so that every block output is a
token grid that a GSPN block can be supervised with), the position-embedding interpolation, and the
sizes (DeiT's tiny/small widths, ViT-B, SigLIP So400m's shape for the foundation size — the shape
C-GSPN's width 1152 suggests for its teacher, which the paper does not name).

Parameters and MACs: ``gspn flops --model vit_nano`` (the attention's ``q kᵀ`` and ``·v`` products
are counted there, where the model is built on the meta device).
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import DropPath, Mlp, MultiHeadSelfAttention
from ._builder import build_model_with_cfg
from ._isotropic import IsotropicEncoder, isotropic_cfg
from ._registry import register_model
from .gspn_vit import PatchEmbed

__all__ = ["POS_EMBEDS", "POS_INTERPS", "TransformerBlock", "VisionTransformer", "sincos_pos_embed"]

#: The position embeddings :class:`VisionTransformer` accepts.
POS_EMBEDS = ("learned", "sincos", "none")
#: The resize modes of its learned position embedding (``F.interpolate`` modes).
POS_INTERPS = ("bicubic", "bilinear")


def sincos_pos_embed(
    dim: int,
    h: int,
    w: int,
    temperature: float = 10000.0,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding of an ``h × w`` grid, ``(1, dim, h, w)``.

    A quarter of the channels each hold ``sin``/``cos`` of the row and of the column index at
    ``dim/4`` geometric frequencies ``temperature^(-k/(dim/4))`` (the 1-D sin-cos code of Vaswani et
    al. 2017 applied per axis).

    Raises:
        ValueError: ``dim`` is not a multiple of 4.
    """
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4 for the sin-cos position embedding, got {dim}")
    quarter = dim // 4
    omega = temperature ** (-torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    ys = torch.arange(h, device=device, dtype=torch.float32)[:, None, None] * omega  # (h, 1, q)
    xs = torch.arange(w, device=device, dtype=torch.float32)[None, :, None] * omega  # (1, w, q)
    ys, xs = ys.expand(h, w, quarter), xs.expand(h, w, quarter)
    emb = torch.cat([ys.sin(), ys.cos(), xs.sin(), xs.cos()], dim=-1)  # (h, w, dim)
    return emb.permute(2, 0, 1)[None].to(dtype)


class TransformerBlock(nn.Module):
    r"""Pre-norm transformer block on channels-last tokens::

        x = x + DropPath(Dropout(MultiHeadSelfAttention(LN(x))))
        x = x + DropPath(Dropout(MLP(LN(x))))   MLP: Linear(D → r·D) → GELU → Dropout → Linear(r·D → D)

    The dropouts (probability ``proj_drop``) are those of timm's ``Block`` and of
    ``torch.nn.TransformerEncoderLayer``: after the attention's output projection, after the MLP's
    activation and after its output; ``attn_drop`` drops attention weights.

    Args:
        dim: width ``D``, divisible by ``num_heads``.
        num_heads: attention heads.
        mlp_ratio: MLP expansion ``r`` (hidden width ``round(r·D)``).
        qkv_bias: bias of the ``qkv`` projection.
        drop_path: stochastic-depth probability of both branches.
        norm_eps: LayerNorm epsilon.
        proj_drop: dropout probability of the branch outputs and the MLP's hidden activation.
        attn_drop: dropout probability of the attention weights (training mode only).

    Shapes: ``(B, H, W, D) → (B, H, W, D)`` (all ``H·W`` tokens attend to each other) or
    ``(B, N, D) → (B, N, D)``.

    Raises:
        ValueError: ``dim`` not divisible by ``num_heads``, or a dropout probability outside
            ``[0, 1)`` (from the attention).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = MultiHeadSelfAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, round(mlp_ratio * dim), drop=proj_drop)
        self.mlp_drop = nn.Dropout(proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp_drop(self.mlp(self.norm2(x))))


class VisionTransformer(IsotropicEncoder):
    """Isotropic attention ViT with a classification head (module docstring for the design).

    Args:
        num_classes: classifier outputs; ``0`` gives pooled features.
        in_chans: input channels.
        patch_size: side ``p`` of the square patches (token stride).
        embed_dim: constant width ``D``.
        depth: number of blocks.
        num_heads: attention heads (``D`` must be divisible by it).
        mlp_ratio: MLP hidden width / ``D``.
        qkv_bias: bias of the attention's ``qkv`` projection.
        pos_embed: ``"learned"`` (a ``(1, D, g, g)`` parameter, resized to the token grid with
            ``pos_interp`` when the input is not ``g·p`` square), ``"sincos"``
            (:func:`sincos_pos_embed`, no parameters) or ``"none"``.
        pos_grid: side ``g`` of the learned position embedding (the token grid of the default input).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linearly increasing over the blocks up to this value.
        norm_eps: LayerNorm epsilon.
        pos_interp: resize mode of the learned position embedding, ``"bicubic"`` (timm's) or
            ``"bilinear"`` (:class:`gspn.models.baselines.ViTBaseline`'s), ``align_corners=False``,
            computed in at least float32.
        proj_drop_rate: dropout of every block's branch outputs and MLP activation
            (:class:`TransformerBlock`'s ``proj_drop``).
        attn_drop_rate: dropout of the attention weights.
        global_pool: ``"avg"`` (default) or ``""``: no pooling, ``forward`` returns the normalised
            token sequence ``(B, h·w, D)`` (per-token logits when ``num_classes > 0``), as timm's
            ViT with ``global_pool=''``.

    Raises:
        ValueError: a non-positive ``depth``/``patch_size``/``pos_grid``, an unknown ``pos_embed`` or
            ``pos_interp``, ``embed_dim`` not divisible by ``num_heads`` (or, for ``"sincos"``, by 4), a
            dropout probability outside ``[0, 1)``.

    Shapes: ``(B, in_chans, H, W) → (B, num_classes)`` for any ``H, W ≥ 1``; the token grid is
    ``⌈H/p⌉ × ⌈W/p⌉``. Float dtypes of the parameters.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        patch_size: int = 16,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        pos_embed: str = "learned",
        pos_grid: int = 14,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        pos_interp: str = "bicubic",
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {', '.join(POS_EMBEDS)}, got {pos_embed!r}")
        if pos_interp not in POS_INTERPS:
            raise ValueError(f"pos_interp must be one of {', '.join(POS_INTERPS)}, got {pos_interp!r}")
        if not isinstance(pos_grid, int) or pos_grid < 1:
            raise ValueError(f"pos_grid must be a positive int, got {pos_grid!r}")
        if pos_embed == "sincos" and embed_dim % 4:
            raise ValueError(f"embed_dim must be a multiple of 4 for pos_embed='sincos', got {embed_dim}")
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.drop_rate = drop_rate
        self.pos_embed_kind = pos_embed
        self.pos_interp = pos_interp
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, pos_grid, pos_grid)) if pos_embed == "learned" else None
        self.blocks = nn.Sequential(
            *[
                TransformerBlock(
                    embed_dim,
                    num_heads,
                    mlp_ratio,
                    qkv_bias,
                    drop_path=rate,
                    norm_eps=norm_eps,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                )
                for rate in rates
            ]
        )
        self._finish_init(embed_dim, depth, patch_size, num_classes, drop_rate, norm_eps, global_pool)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def position_embedding(self, h: int, w: int, like: torch.Tensor | None = None) -> torch.Tensor | None:
        """The position embedding added to an ``h × w`` token grid, ``(1, D, h, w)`` (``None``: none).

        ``like``: the tokens it is added to; a computed (``"sincos"``) embedding takes their device and
        dtype (default: those of the patch embedding's weight, which an offloaded model may hold on
        the meta device between calls).
        """
        if self.pos_embed_kind == "sincos":
            ref = self.patch_embed.proj.weight if like is None else like
            return sincos_pos_embed(self.embed_dim, h, w, device=ref.device, dtype=ref.dtype)
        pos = self.pos_embed
        if pos is None or tuple(pos.shape[-2:]) == (h, w):
            return pos
        src = pos if pos.dtype in (torch.float32, torch.float64) else pos.float()  # resized in >= fp32
        return F.interpolate(src, size=(h, w), mode=self.pos_interp, align_corners=False).to(pos.dtype)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` → channels-last tokens with position ``(B, h, w, D)``."""
        x = self.patch_embed(x)
        pos = self.position_embedding(*x.shape[-2:], like=x)
        if pos is not None:
            x = x + pos
        return x.permute(0, 2, 3, 1)


# --- configurations and registry ------------------------------------------------------------------


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return isotropic_cfg(**kwargs)


default_cfgs: dict[str, dict[str, Any]] = {
    "vit_nano": _cfg(
        input_size=(3, 32, 32),
        pool_size=(8, 8),
        crop_pct=1.0,
        config_source="ours (CPU tests and demos; the shape of gspn_vit_nano)",
    ),
    "vit_tiny": _cfg(config_source="DeiT-Ti shape (Touvron et al. 2021); the shape of gspn_vit_tiny"),
    "vit_small": _cfg(config_source="DeiT-S shape (Touvron et al. 2021); the shape of gspn_vit_small"),
    "vit_base": _cfg(config_source="ViT-B shape (Dosovitskiy et al. 2021); the shape of gspn_vit_base"),
    "vit_so400m": _cfg(
        pool_size=(16, 16),
        config_source="SigLIP So400m's shape (width 1152, depth 27, MLP 4304, patch 14, "
        "16 heads), assumed for C-GSPN's teacher; the shape of gspn_vit_so400m",
    ),
}


_create_vit = partial(build_model_with_cfg, VisionTransformer)


@register_model
def vit_nano(pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> VisionTransformer:
    """ViT-nano (ours, for tests and CPU demos): D=64, depth 4, patch 4, 2 heads, MLP 256 (gspn_vit_nano's shape)."""
    config = dict(embed_dim=64, depth=4, patch_size=4, num_heads=2, pos_grid=8)
    return _create_vit("vit_nano", pretrained, config, **kwargs)


@register_model
def vit_tiny(pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Ti (DeiT-Ti shape): D=192, depth 12, patch 16, 3 heads (gspn_vit_tiny's shape)."""
    config = dict(embed_dim=192, depth=12, patch_size=16, num_heads=3, pos_grid=14)
    return _create_vit("vit_tiny", pretrained, config, **kwargs)


@register_model
def vit_small(pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> VisionTransformer:
    """ViT-S (DeiT-S shape): D=384, depth 12, patch 16, 6 heads (gspn_vit_small's shape)."""
    config = dict(embed_dim=384, depth=12, patch_size=16, num_heads=6, pos_grid=14)
    return _create_vit("vit_small", pretrained, config, **kwargs)


@register_model
def vit_base(pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> VisionTransformer:
    """ViT-B: D=768, depth 12, patch 16, 12 heads (gspn_vit_base's shape)."""
    config = dict(embed_dim=768, depth=12, patch_size=16, num_heads=12, pos_grid=14)
    return _create_vit("vit_base", pretrained, config, **kwargs)


@register_model
def vit_so400m(pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> VisionTransformer:
    """So400m shape: D=1152, depth 27, MLP 4304, patch 14, 16 heads (gspn_vit_so400m's shape)."""
    config = dict(embed_dim=1152, depth=27, patch_size=14, num_heads=16, mlp_ratio=4304 / 1152, pos_grid=16)
    return _create_vit("vit_so400m", pretrained, config, **kwargs)
