"""Small baseline classifiers trained with the same recipe as the GSPN models.

They exist for the evidence benchmark (``benchmarks/train_digits.py``): a ViT-style attention model and a
ResNet-style convolutional model whose width can be chosen so that their parameter count matches a GSPN
model's (:func:`match_params`). Both accept any input resolution. They are registered models
(``create_model("baseline_vit")``, ``list_models(task="classification")``) under the names
``baseline_vit`` and ``baseline_conv``, so everything the trainer does to a GSPN model (checkpoints,
``gspn eval``, DDP, :func:`gspn.models.load_model` of the exported weights) works for them unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.attention import MultiHeadSelfAttention
from ._registry import register_model
from .checkpoint import load_pretrained
from .complexity import count_params

__all__ = ["BASELINES", "ConvBaseline", "ViTBaseline", "count_params", "match_params"]


def _default_cfg(in_chans: int, num_classes: int, size: int = 32) -> dict[str, Any]:
    return {
        "input_size": (in_chans, size, size),
        "mean": (0.5,) * in_chans,
        "std": (0.5,) * in_chans,
        "num_classes": num_classes,
        "classifier": "head",
    }


class _LinearHead(nn.Module):
    """timm-style classifier API of the baselines: ``self.head`` is a Linear on ``num_features``
    pooled features, or ``Identity`` when ``num_classes == 0`` (the model then returns the features)."""

    num_features: int
    num_classes: int
    head: nn.Module
    default_cfg: dict[str, Any]

    def _make_head(self, num_classes: int, like: torch.Tensor | None = None) -> None:
        self.num_classes = num_classes
        kw = {"device": like.device, "dtype": like.dtype} if like is not None else {}
        self.head = nn.Linear(self.num_features, num_classes, **kw) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        """The final Linear (or ``Identity`` when ``num_classes == 0``)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a fresh one for ``num_classes`` outputs (0 = features only).

        ``global_pool``: ``None`` or ``"avg"`` (the baselines mean-pool); anything else raises ``ValueError``.
        """
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool={global_pool!r} is not supported: the baselines pool by 'avg' only")
        self._make_head(num_classes, like=next(self.parameters()))
        self.default_cfg["num_classes"] = num_classes


#: Parameter names of :class:`MultiHeadSelfAttention` → those of ``nn.MultiheadAttention`` (same tensors,
#: same ``[q; k; v]`` row layout), in ``nn.MultiheadAttention``'s order.
_TORCH_MHA_NAMES = {"qkv.weight": "in_proj_weight", "qkv.bias": "in_proj_bias",
                    "proj.weight": "out_proj.weight", "proj.bias": "out_proj.bias"}


class _TorchLayoutAttention(MultiHeadSelfAttention):
    """:class:`MultiHeadSelfAttention` whose state dict uses ``nn.MultiheadAttention``'s parameter names.

    The ViT baseline's blocks were ``nn.TransformerEncoderLayer``; this keeps its weight files (and the
    keys of every file written since) unchanged: ``state_dict()`` writes ``in_proj_weight``,
    ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias`` and ``load_state_dict`` reads them.
    """

    def __init__(self, dim: int, num_heads: int, attn_drop: float) -> None:
        super().__init__(dim, num_heads, attn_drop=attn_drop)
        self.register_state_dict_post_hook(_to_torch_mha_names)
        self.register_load_state_dict_pre_hook(_from_torch_mha_names)


def _to_torch_mha_names(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for ours, theirs in _TORCH_MHA_NAMES.items():
        if prefix + ours in state_dict:
            state_dict[prefix + theirs] = state_dict.pop(prefix + ours)


def _from_torch_mha_names(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    for ours, theirs in _TORCH_MHA_NAMES.items():
        if prefix + theirs in state_dict:
            state_dict[prefix + ours] = state_dict.pop(prefix + theirs)


class _EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer: ``x + drop(attn(norm1 x))``, then ``x + drop(mlp(norm2 x))``.

    The computation and state-dict keys of ``torch.nn.TransformerEncoderLayer(norm_first=True,
    activation="gelu", batch_first=True)``, which the ViT baseline used before, with the attention of
    :class:`gspn.nn.MultiHeadSelfAttention`. Shapes: ``(B, N, C) → (B, N, C)``.
    """

    def __init__(self, dim: int, num_heads: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.self_attn = _TorchLayoutAttention(dim, num_heads, attn_drop=drop)
        self.linear1 = nn.Linear(dim, hidden)
        self.dropout = nn.Dropout(drop)
        self.linear2 = nn.Linear(hidden, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout1 = nn.Dropout(drop)
        self.dropout2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout1(self.self_attn(self.norm1(x)))
        return x + self.dropout2(self.linear2(self.dropout(F.gelu(self.linear1(self.norm2(x))))))


class _Encoder(nn.Module):
    """``layers`` applied in order (the ``blocks.layers.<i>`` key layout of ``nn.TransformerEncoder``)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class ViTBaseline(_LinearHead):
    """A small pre-norm ViT: patch embedding, learned positional embedding, mean-pooled tokens.

    The positional embedding is defined on a ``pos_grid × pos_grid`` grid and bilinearly resized to the
    actual token grid, so any input size works. The attention is :class:`gspn.nn.MultiHeadSelfAttention`;
    the state-dict keys are those of the ``nn.TransformerEncoderLayer`` blocks it had before
    (``blocks.layers.<i>.self_attn.in_proj_weight`` …), so earlier weight files load unchanged.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        embed_dim: int = 64,
        depth: int = 4,
        num_heads: int | None = None,
        mlp_ratio: float = 2.0,
        patch_size: int = 4,
        pos_grid: int = 8,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        # default: as many heads (≤ 8) as keep a head dimension of at least 16
        heads = num_heads or next(
            h for h in (8, 4, 2, 1) if h == 1 or (embed_dim % h == 0 and embed_dim // h >= 16)
        )
        if embed_dim % heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {heads}")
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, pos_grid, pos_grid))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        hidden = int(embed_dim * mlp_ratio)
        self.blocks = _Encoder([_EncoderLayer(embed_dim, heads, hidden, drop) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.num_features = embed_dim
        self._make_head(num_classes)
        self.default_cfg = _default_cfg(in_chans, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for images ``(B, C, H, W)``; pooled ``(B, num_features)`` if headless."""
        x = self.patch_embed(x)
        pos = self.pos_embed
        if pos.shape[-2:] != x.shape[-2:]:
            pos = F.interpolate(pos, size=x.shape[-2:], mode="bilinear", align_corners=False)
        x = (x + pos).flatten(2).transpose(1, 2)
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(y)) + self.short(x), inplace=True)


class ConvBaseline(_LinearHead):
    """A small ResNet: 3×3 stem, stages of basic blocks (widths ``width·2^i``, stride 2 after the first)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        width: int = 32,
        depths: Sequence[int] = (1, 1, 1),
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        blocks: list[nn.Module] = []
        cin = width
        for i, d in enumerate(depths):
            cout = width * 2**i
            for j in range(d):
                blocks.append(_BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.stages = nn.Sequential(*blocks)
        self.num_features = cin
        self._make_head(num_classes)
        self.default_cfg = _default_cfg(in_chans, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for images ``(B, C, H, W)``; pooled ``(B, num_features)`` if headless."""
        x = self.stages(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


default_cfgs: dict[str, dict[str, Any]] = {
    "baseline_vit": {"task": "classification", "input_size": (3, 32, 32), "num_classes": 10, "classifier": "head"},
    "baseline_conv": {"task": "classification", "input_size": (3, 32, 32), "num_classes": 10, "classifier": "head"},
}


def _create_baseline(name: str, cls: type[_LinearHead], pretrained: bool | str | os.PathLike,
                     kw: dict[str, Any]) -> nn.Module:
    if pretrained is True:
        raise ValueError("baselines have no published weights; pass pretrained='path/to/weights.safetensors'")
    model = cls(**kw)
    model.default_cfg = {**model.default_cfg, "architecture": name}
    model.model_args = dict(kw)  # type: ignore[attr-defined]
    load_pretrained(model, pretrained)
    return model


@register_model
def baseline_vit(
    num_classes: int = 10, in_chans: int = 3, pretrained: bool | str | os.PathLike = False, **kw: Any
) -> nn.Module:
    """ViT-style attention baseline (see :class:`ViTBaseline` for the keyword arguments)."""
    return _create_baseline("baseline_vit", ViTBaseline, pretrained,
                            {"num_classes": num_classes, "in_chans": in_chans, **kw})


@register_model
def baseline_conv(
    num_classes: int = 10, in_chans: int = 3, pretrained: bool | str | os.PathLike = False, **kw: Any
) -> nn.Module:
    """Convolutional baseline (see :class:`ConvBaseline` for the keyword arguments)."""
    return _create_baseline("baseline_conv", ConvBaseline, pretrained,
                            {"num_classes": num_classes, "in_chans": in_chans, **kw})


#: Baseline constructors by name (also registered: :func:`gspn.models.create_model`).
BASELINES: dict[str, Callable[..., nn.Module]] = {
    "baseline_vit": baseline_vit,
    "baseline_conv": baseline_conv,
}

#: The keyword that sets each baseline's width, and the candidate widths :func:`match_params` tries.
_WIDTH_KEY = {"baseline_vit": ("embed_dim", range(16, 1025, 8)), "baseline_conv": ("width", range(4, 513, 2))}


def match_params(
    name: str, target_params: int, num_classes: int = 10, in_chans: int = 3, **kw: Any
) -> dict[str, Any]:
    """Keyword overrides giving baseline ``name`` the parameter count closest to ``target_params``.

    Only the width is searched (``embed_dim`` for the ViT, ``width`` for the conv net); other keyword
    arguments (depth, patch size, …) are passed through and kept fixed.
    """
    key, widths = _WIDTH_KEY[name]
    best: tuple[int, int] | None = None
    for w in widths:
        n = count_params(BASELINES[name](num_classes=num_classes, in_chans=in_chans, **{**kw, key: w}))
        if best is None or abs(n - target_params) < abs(best[1] - target_params):
            best = (w, n)
        if n > target_params:  # the count grows with the width: no closer candidate follows
            break
    assert best is not None
    return {**kw, key: best[0]}
