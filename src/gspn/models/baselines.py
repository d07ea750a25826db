"""Small baseline classifiers trained with the same recipe as the GSPN models.

They exist for the evidence benchmark (``benchmarks/train_digits.py``): a ViT (:class:`ViTBaseline`, a
configuration of :class:`gspn.models.vit.VisionTransformer`) and a ResNet-style convolutional model
whose width can be chosen so that their parameter count matches a GSPN model's (:func:`match_params`).
Both accept any input resolution (the ViT: at least one patch). They are registered models
(``create_model("baseline_vit")``, ``list_models(task="classification")``) under the names
``baseline_vit`` and ``baseline_conv``, so everything the trainer does to a GSPN model (checkpoints,
``gspn eval``, DDP, :func:`gspn.models.load_model` of the exported weights) works for them unchanged.
Both take timm's ``global_pool=""`` (no pooling) and ``create_model(..., features_only=True)``, as
the GSPN classifiers do.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._builder import build_model_with_cfg, record_head_args
from ._features import feature_indices
from ._registry import register_model
from .complexity import count_params
from .gspn_vision import check_global_pool
from .gspn_vit import PatchEmbed
from .vit import VisionTransformer

__all__ = ["BASELINES", "ConvBaseline", "ViTBaseline", "count_params", "match_params"]


def _default_cfg(in_chans: int, num_classes: int, size: int = 32, classifier: str = "head") -> dict[str, Any]:
    return {
        "input_size": (in_chans, size, size),
        "mean": (0.5,) * in_chans,
        "std": (0.5,) * in_chans,
        "num_classes": num_classes,
        "classifier": classifier,
    }


class _LinearHead(nn.Module):
    """timm-style classifier API of :class:`ConvBaseline`: ``self.head`` is a Linear on ``num_features``
    pooled features, or ``Identity`` when ``num_classes == 0`` (the model then returns the features).

    ``global_pool=""`` (timm's "no pooling"): the Linear runs on every pixel of the final map,
    ``(B, num_classes, h, w)``, or returns the map ``(B, num_features, h, w)`` when headless.
    """

    num_features: int
    num_classes: int
    head: nn.Module
    default_cfg: dict[str, Any]
    model_args: dict[str, Any]
    global_pool: str = "avg"

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
        if global_pool is not None:
            self.global_pool = check_global_pool(global_pool, "the baselines")
        self._make_head(num_classes, like=next(self.parameters()))
        self.default_cfg["num_classes"] = num_classes
        record_head_args(getattr(self, "model_args", None), num_classes, global_pool)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Head on the final map ``(B, C, h, w)``: logits ``(B, num_classes)`` (pooled features if
        ``pre_logits``); unpooled with ``global_pool=""``."""
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
            return x if pre_logits else self.head(x)
        if pre_logits or isinstance(self.head, nn.Identity):
            return x
        return self.head(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _UnpaddedPatchEmbed(PatchEmbed):
    """:class:`~gspn.models.gspn_vit.PatchEmbed` without the padding: a ``p×p`` stride-``p`` convolution
    that drops the last ``H mod p`` rows and ``W mod p`` columns, as the ViT baseline always has.

    Shapes: ``(B, in_chans, H, W) → (B, dim, ⌊H/p⌋, ⌊W/p⌋)``; ``H, W ≥ p``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _old_key_names(depth: int) -> dict[str, str]:
    """Old (``nn.TransformerEncoderLayer``-era) state-dict key of :class:`ViTBaseline` → current key."""
    names = {
        "patch_embed.weight": "patch_embed.proj.weight",
        "patch_embed.bias": "patch_embed.proj.bias",
        "norm.weight": "head.norm.weight",
        "norm.bias": "head.norm.bias",
        "head.weight": "head.fc.weight",
        "head.bias": "head.fc.bias",
    }
    per_block = {
        "self_attn.in_proj_weight": "attn.qkv.weight",
        "self_attn.in_proj_bias": "attn.qkv.bias",
        "self_attn.out_proj.weight": "attn.proj.weight",
        "self_attn.out_proj.bias": "attn.proj.bias",
        "linear1.weight": "mlp.fc1.weight",
        "linear1.bias": "mlp.fc1.bias",
        "linear2.weight": "mlp.fc2.weight",
        "linear2.bias": "mlp.fc2.bias",
        "norm1.weight": "norm1.weight",
        "norm1.bias": "norm1.bias",
        "norm2.weight": "norm2.weight",
        "norm2.bias": "norm2.bias",
    }
    for i in range(depth):
        names.update({f"blocks.layers.{i}.{old}": f"blocks.{i}.{cur}" for old, cur in per_block.items()})
    return names


class ViTBaseline(VisionTransformer):
    """The ViT baseline: a :class:`~gspn.models.vit.VisionTransformer` in the configuration the
    evidence benchmark has always trained.

    Compared with the ``vit_*`` models: the learned position embedding (``pos_grid × pos_grid``) is
    resized bilinearly to the token grid (``pos_interp="bilinear"``), LayerNorm epsilon ``1e-5``, the
    MLP's hidden width is ``int(embed_dim · mlp_ratio)``, dropout ``drop`` on the attention weights,
    the branch outputs and the MLP activation (no stochastic depth, none before the classifier), the
    default head count below, and the patch embedding does not pad: the token grid is
    ``⌊H/p⌋ × ⌊W/p⌋``. The head is the ViT's: LN → mean over tokens → Linear.

    Args:
        num_classes: classifier outputs; ``0`` gives pooled features ``(B, embed_dim)``.
        in_chans: input channels.
        embed_dim: width ``D``.
        depth: number of transformer blocks.
        num_heads: attention heads; ``None``: the most of 8, 4, 2 that divides ``D`` with a head
            dimension of at least 16, else 1.
        mlp_ratio: MLP hidden width / ``D``.
        patch_size: side ``p`` of the patches.
        pos_grid: side of the learned position embedding.
        drop: dropout probability (see above).
        global_pool: ``"avg"`` (default) or ``""`` (no pooling: the token sequence, as timm's ViT).

    Shapes: ``(B, in_chans, H, W) → (B, num_classes)`` for ``H, W ≥ patch_size``.

    Raises:
        ValueError: ``embed_dim`` not divisible by ``num_heads``, or the errors of
            :class:`~gspn.models.vit.VisionTransformer`.

    Weight files: ``state_dict()`` has :class:`~gspn.models.vit.VisionTransformer`'s key names
    (``blocks.<i>.attn.qkv.weight`` …). Files written before, with the key names of the
    ``nn.TransformerEncoderLayer`` blocks (``blocks.layers.<i>.self_attn.in_proj_weight``,
    ``linear1``, ``norm`` and ``head`` at the top …), still load: a load-state-dict pre-hook renames
    their keys, and :func:`baseline_vit` (hence :func:`gspn.models.load_model`) renames them before
    its strict key check.
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
        global_pool: str = "avg",
    ) -> None:
        # default: as many heads (≤ 8) as keep a head dimension of at least 16
        heads = num_heads or next(h for h in (8, 4, 2, 1) if h == 1 or (embed_dim % h == 0 and embed_dim // h >= 16))
        if embed_dim % heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {heads}")
        hidden = int(embed_dim * mlp_ratio)
        super().__init__(
            num_classes=num_classes,
            in_chans=in_chans,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=heads,
            mlp_ratio=hidden / embed_dim,  # round(hidden / D · D) == hidden: the width int() always gave
            pos_embed="learned",
            pos_grid=pos_grid,
            pos_interp="bilinear",
            norm_eps=1e-5,
            proj_drop_rate=drop,
            attn_drop_rate=drop,
            drop_rate=0.0,
            drop_path_rate=0.0,
            global_pool=global_pool,
        )
        self.patch_embed = _UnpaddedPatchEmbed(in_chans, embed_dim, patch_size)
        self.default_cfg = _default_cfg(in_chans, num_classes, classifier="head.fc")
        for block in self.blocks:
            # nn.TransformerEncoderLayer's parameter order (attention, MLP, norms): optimizer states of
            # older last.pt files, which match parameters by position, then resume onto the right tensors.
            for name in ("attn", "mlp", "norm1", "norm2", "mlp_drop", "drop_path"):
                block._modules[name] = block._modules.pop(name)
        self._old_keys = _old_key_names(depth)
        self.register_load_state_dict_pre_hook(_rename_old_keys_hook)

    def upgrade_state_dict(self, state_dict: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        """``state_dict`` with the old key names (see the class docstring) under ``prefix`` renamed to
        the current ones, in place; it is returned. Current names are left as they are."""
        for old, cur in self._old_keys.items():
            if prefix + old in state_dict:
                state_dict[prefix + cur] = state_dict.pop(prefix + old)
        return state_dict


def _rename_old_keys_hook(module: ViTBaseline, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    module.upgrade_state_dict(state_dict, prefix)


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
    """A small ResNet: 3×3 stem, stages of basic blocks (widths ``width·2^i``, stride 2 after the first).

    The blocks of all stages are ``stages.0``, ``stages.1``, ...; ``feature_info`` names the last
    block of every (non-empty) stage, reductions 1, 2, 4, ...
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        width: int = 32,
        depths: Sequence[int] = (1, 1, 1),
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        self.global_pool = check_global_pool(global_pool, "the baselines")
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        blocks: list[nn.Module] = []
        self.feature_info: list[dict[str, Any]] = []
        self._stage_ends: list[int] = []  # blocks up to the end of each non-empty stage
        cin, reduction = width, 1
        for i, d in enumerate(depths):
            cout = width * 2**i
            for j in range(d):
                stride = 2 if (j == 0 and i > 0) else 1
                blocks.append(_BasicBlock(cin, cout, stride))
                cin, reduction = cout, reduction * stride
            if d > 0:
                self._stage_ends.append(len(blocks))
                info = {"num_chs": cout, "reduction": reduction, "module": f"stages.{len(blocks) - 1}"}
                self.feature_info.append(info)
        self.stages = nn.Sequential(*blocks)
        self.num_features = cin
        self._make_head(num_classes)
        self.default_cfg = _default_cfg(in_chans, num_classes)

    @property
    def default_out_indices(self) -> tuple[int, ...]:
        """The stages ``features_only`` returns by default: all of them (timm's default)."""
        return tuple(range(len(self.feature_info)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W) → (B, num_features, h, w)``, the final map before pooling."""
        return self.stages(self.stem(x))

    def forward_intermediates(
        self, x: torch.Tensor, indices: int | Sequence[int] | None = None, intermediates_only: bool = False
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (timm-style): ``indices`` ``None`` = all stages, an int ``n`` = the last
        ``n``, or a list of (possibly negative) stage indices. Returns the list of ``(B, C_i, h_i, w_i)``
        maps, preceded by the :meth:`forward_features` output unless ``intermediates_only`` (then the
        blocks after the last wanted stage are not run).

        Raises:
            IndexError: an index or count out of range for the stages.
        """
        ends = [e for e in self._stage_ends if e <= len(self.stages)]  # of the (possibly pruned) model
        wanted = {ends[i] for i in feature_indices(indices, len(ends), "stage")}
        stop = max(wanted, default=0) if intermediates_only else len(self.stages)
        outs = []
        x = self.stem(x)
        for i, block in enumerate(self.stages):
            if i >= stop:
                break
            x = block(x)
            if i + 1 in wanted:
                outs.append(x)
        return outs if intermediates_only else (x, outs)

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """timm's pruning for feature extraction: drop the blocks after the last stage of ``indices``
        (``prune_head``: ``reset_classifier(0, "")``; ``prune_norm``: no final norm here). Returns the
        taken stages, sorted non-negative."""
        ends = [e for e in self._stage_ends if e <= len(self.stages)]
        take = feature_indices(indices, len(ends), "stage")
        if not take:
            raise IndexError("indices selects no stage to keep")
        self.stages = self.stages[: ends[take[-1]]]
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for images ``(B, C, H, W)``; pooled ``(B, num_features)`` if headless
        (unpooled maps with ``global_pool=""``)."""
        return self.forward_head(self.forward_features(x))


default_cfgs: dict[str, dict[str, Any]] = {
    "baseline_vit": {"task": "classification", "input_size": (3, 32, 32), "num_classes": 10, "classifier": "head.fc"},
    "baseline_conv": {"task": "classification", "input_size": (3, 32, 32), "num_classes": 10, "classifier": "head"},
}


@register_model
def baseline_vit(
    num_classes: int = 10, in_chans: int = 3, pretrained: bool | str | os.PathLike = False, **kw: Any
) -> nn.Module:
    """ViT-style attention baseline (see :class:`ViTBaseline` for the keyword arguments)."""
    config = {"num_classes": num_classes, "in_chans": in_chans}
    return build_model_with_cfg(ViTBaseline, "baseline_vit", pretrained, config, **kw)


@register_model
def baseline_conv(
    num_classes: int = 10, in_chans: int = 3, pretrained: bool | str | os.PathLike = False, **kw: Any
) -> nn.Module:
    """Convolutional baseline (see :class:`ConvBaseline` for the keyword arguments)."""
    config = {"num_classes": num_classes, "in_chans": in_chans}
    return build_model_with_cfg(ConvBaseline, "baseline_conv", pretrained, config, **kw)


#: Baseline constructors by name (also registered: :func:`gspn.models.create_model`).
BASELINES: dict[str, Callable[..., nn.Module]] = {
    "baseline_vit": baseline_vit,
    "baseline_conv": baseline_conv,
}

#: The keyword that sets each baseline's width, and the candidate widths :func:`match_params` tries.
_WIDTH_KEY = {"baseline_vit": ("embed_dim", range(16, 1025, 8)), "baseline_conv": ("width", range(4, 513, 2))}


def match_params(name: str, target_params: int, num_classes: int = 10, in_chans: int = 3, **kw: Any) -> dict[str, Any]:
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
