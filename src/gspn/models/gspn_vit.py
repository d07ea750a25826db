"""Isotropic, ViT-style GSPN encoders (``gspn_vit_*``), after C-GSPN [P3] and GSPN-2 [P2].

C-GSPN ("Scaling Parallel Sequence Models to Foundation-Scale Vision Encoders", arXiv 2606.00746)
replaces the attention of a plain ViT by GSPN: one patch embedding, then ``N`` identical blocks of
constant width (no downsampling stages) that run the propagation *in a compressed latent space*
with fused normalisation and lightweight projections, scaled to a foundation-size width of 1152.
GSPN-2 (arXiv 2512.07884) describes the compression: project to a small proxy channel space,
propagate there with channel-shared weights, lift back. Neither releases code nor per-layer
configurations; this module is our reading of them::

    patch embed: pad to a multiple of p → conv p×p stride p (in_chans → D)     (⌈H/p⌉ × ⌈W/p⌉ tokens)
    depth ×      GSPNBlock(D):  x + DropPath(GSPNMixer(LN x)),  x + DropPath(MLP(LN x))
                 GSPNMixer:     Linear(D → expand·D) → dw k×k conv → SiLU
                                → GSPN2d(expand·D, propagation_channels=Cp)   (compact: C → Cp → C)
                                → LN → GRN → Linear(→ D)
    head:        LN → global average pool → dropout → Linear

**From the papers:** the isotropic layout (patch embedding, identical constant-width blocks), the
propagation in a compressed channel space with channel-shared propagation weights (one gate set
for all ``Cp`` proxy channels, the default of :class:`~gspn.nn.GSPN2d`'s compact mode), the width
1152 of the foundation-size model, and no position embedding being needed (GSPN's scans are
position-aware; any input size works). **Ours:** the block internals (GSPN-1's classification
mixer with ``expand=1``, so a block has ``≈10·D²`` parameters against a ViT block's ``12·D²`` —
about the 15 % fewer parameters C-GSPN reports against its ViT, not a figure we match by
design), ``Cp = D/8``, ``d_state = 16``, global scans in every block, patch size 16, the
tiny/small/base widths and depths (DeiT's 192/384/768, depth 12), the foundation depth and MLP width
(27 blocks, MLP 4304, patch 14: SigLIP So400m's shape, which we assume the 1152-wide teacher was;
the paper does not name it), the mean-pool head, and reading "fused normalisation" as the gate
normalisation fused into the scan operator (:func:`gspn.ops.gspn_mix`).

Parameters and MACs: ``gspn flops --model gspn_vit_tiny``, or :func:`gspn.models.complexity`.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import GSPNBlock
from ._builder import build_model_with_cfg
from ._isotropic import IsotropicEncoder, isotropic_cfg
from ._registry import register_model

__all__ = ["GSPNViT", "PatchEmbed"]


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: zero-pad the bottom/right to a multiple of ``patch_size``,
    then a ``p×p`` stride-``p`` convolution.

    Shapes: ``(B, in_chans, H, W) → (B, dim, ⌈H/p⌉, ⌈W/p⌉)``; any ``H, W ≥ 1``.
    """

    def __init__(self, in_chans: int, dim: int, patch_size: int) -> None:
        super().__init__()
        if patch_size < 1:
            raise ValueError(f"patch_size must be a positive int, got {patch_size}")
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        pad_h, pad_w = -x.shape[-2] % p, -x.shape[-1] % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.proj(x)


class GSPNViT(IsotropicEncoder):
    """Isotropic GSPN encoder with a classification head (module docstring for the design).

    Args:
        num_classes: classifier outputs; ``0`` gives pooled features.
        in_chans: input channels.
        patch_size: side ``p`` of the square patches (token stride).
        embed_dim: constant width ``D``.
        depth: number of identical blocks.
        mlp_ratio: MLP hidden width / ``D``.
        propagation_channels: proxy width ``Cp`` of the compact propagation in every block
            (``None``: propagate all ``expand·D`` channels, GSPN-1 style).
        d_state: proxy dimension that generates the propagation parameters.
        expand: mixer expansion (``d_inner = expand · D``).
        kernel_size: depthwise conv of the mixer (``0`` removes it).
        chunk_size: ``None`` (default): global scans in every block; ``k``: local scans over tiles
            of ``k`` lines.
        gate_channels: gate channels of each GSPN layer (``None``: 1 in the compact mode, one gate
            set for all proxy channels; per channel otherwise).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linearly increasing over the blocks up to this value.
        norm_eps: LayerNorm epsilon.
        backend: backend of the GSPN operator.
        conv_act: SiLU after the depthwise conv.
        fused: GSPN layers as the fused operator :func:`gspn.ops.gspn_mix` (default) or the
            materialising composition (``False``; same weights and numbers).
        global_pool: ``"avg"`` (default) or ``""``: no pooling, ``forward`` returns the normalised
            token sequence ``(B, h·w, D)`` (per-token logits when ``num_classes > 0``), as timm's
            ViT with ``global_pool=''``.

    Raises:
        ValueError: a non-positive ``depth``/``patch_size``, or a bad GSPN option (see
            :class:`~gspn.nn.GSPN2d`).

    Shapes: ``(B, in_chans, H, W) → (B, num_classes)`` for any ``H, W``; the token grid is
    ``⌈H/p⌉ × ⌈W/p⌉``.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        patch_size: int = 16,
        embed_dim: int = 384,
        depth: int = 12,
        mlp_ratio: float = 4.0,
        propagation_channels: int | None = 48,
        d_state: int = 16,
        expand: float = 1.0,
        kernel_size: int = 7,
        chunk_size: int | None = None,
        gate_channels: int | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        backend: str = "auto",
        conv_act: bool = True,
        fused: bool = True,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth}")
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.drop_rate = drop_rate
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size)
        self.blocks = nn.Sequential(
            *[
                GSPNBlock(
                    embed_dim,
                    mlp_ratio=mlp_ratio,
                    drop_path=rate,
                    norm_eps=norm_eps,
                    d_state=d_state,
                    expand=expand,
                    kernel_size=kernel_size,
                    chunk_size=chunk_size,
                    gate_channels=gate_channels,
                    backend=backend,
                    conv_act=conv_act,
                    fused=fused,
                    propagation_channels=propagation_channels,
                )
                for rate in rates
            ]
        )
        self._finish_init(embed_dim, depth, patch_size, num_classes, drop_rate, norm_eps, global_pool)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x).permute(0, 2, 3, 1)


# --- configurations and registry ------------------------------------------------------------------


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return isotropic_cfg(reference_semantics=False, **kwargs)  # no reference code or checkpoints exist


default_cfgs: dict[str, dict[str, Any]] = {
    # config_source: where each configuration comes from (the papers state only the width 1152).
    "gspn_vit_nano": _cfg(
        input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0, config_source="ours (CPU tests and demos)"
    ),
    "gspn_vit_tiny": _cfg(config_source="ours (DeiT-Ti width/depth)"),
    "gspn_vit_small": _cfg(config_source="ours (DeiT-S width/depth)"),
    "gspn_vit_base": _cfg(config_source="ours (ViT-B width/depth)"),
    "gspn_vit_so400m": _cfg(
        input_size=(3, 224, 224),
        pool_size=(16, 16),
        config_source="width 1152: C-GSPN [P3]; depth 27, MLP 4304, patch 14: ours "
        "(SigLIP So400m's shape, the assumed teacher)",
    ),
}


# the reference classifiers' plan (our files and their options); no reference checkpoint fits
_create_gspn_vit = partial(build_model_with_cfg, GSPNViT, reference="classifier")


@register_model
def gspn_vit_nano(pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> GSPNViT:
    """GSPN-ViT-nano (ours, for tests and CPU demos): D=64, depth 4, patch 4, Cp=16, d_state 8."""
    config = dict(embed_dim=64, depth=4, patch_size=4, propagation_channels=16, d_state=8)
    return _create_gspn_vit("gspn_vit_nano", pretrained, config, **kwargs)


@register_model
def gspn_vit_tiny(pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> GSPNViT:
    """GSPN-ViT-Ti (ours): D=192, depth 12, patch 16, Cp=24."""
    config = dict(embed_dim=192, depth=12, patch_size=16, propagation_channels=24)
    return _create_gspn_vit("gspn_vit_tiny", pretrained, config, **kwargs)


@register_model
def gspn_vit_small(pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> GSPNViT:
    """GSPN-ViT-S (ours): D=384, depth 12, patch 16, Cp=48."""
    config = dict(embed_dim=384, depth=12, patch_size=16, propagation_channels=48)
    return _create_gspn_vit("gspn_vit_small", pretrained, config, **kwargs)


@register_model
def gspn_vit_base(pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> GSPNViT:
    """GSPN-ViT-B (ours): D=768, depth 12, patch 16, Cp=96."""
    config = dict(embed_dim=768, depth=12, patch_size=16, propagation_channels=96)
    return _create_gspn_vit("gspn_vit_base", pretrained, config, **kwargs)


@register_model
def gspn_vit_so400m(pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> GSPNViT:
    """Foundation size: D=1152 (C-GSPN's width); depth 27, MLP 4304, patch 14 (ours: SigLIP
    So400m's shape), Cp=144."""
    config = dict(embed_dim=1152, depth=27, patch_size=14, mlp_ratio=4304 / 1152, propagation_channels=144)
    return _create_gspn_vit("gspn_vit_so400m", pretrained, config, **kwargs)
