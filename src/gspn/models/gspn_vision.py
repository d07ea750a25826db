"""GSPN vision backbones for classification: GSPN-T/S/B of the paper plus small CPU-friendly sizes.

Architecture (Swin-style four stages, widths ``C, 2C, 4C, 8C``)::

    stem:        conv3×3 s2 (→ C/2) → LN → GELU → conv3×3 s2 (→ C) → LN          (stride 4)
    stage i:     [downsample: conv3×3 s2 → LN   (i > 0)] → depth_i × GSPNBlock
    head:        LN → global average pool → dropout → Linear

Dense prediction (as timm): ``global_pool=""`` (constructor or :meth:`~ClassifierAPI.reset_classifier`)
drops the pooling, so ``forward`` returns the head's normalised final map (per-pixel logits when
``num_classes > 0``); ``create_model(name, features_only=True, out_indices=(0, 1, 2, 3))`` returns
the stage maps (:class:`gspn.models.FeatureListNet`, strides 4, 8, 16, 32).

Each :class:`~gspn.nn.GSPNBlock` is ``x + DropPath(GSPNMixer(LN(x)))`` then
``x + DropPath(MLP(LN(x)))``; the mixer expands to ``1.5·C``, runs a 7×7 depthwise conv, SiLU,
:class:`~gspn.nn.GSPN2d`, LN, GRN, and projects back. Blocks are *local* (scans restart every 2
lines) except in the stages marked global, where block ``d`` is global if ``d < 7`` or
``(d + 1) % 7 == 0`` (the reference rule). No positional embedding: any input size works.

Reference configurations at 224², 1000 classes (parameters exact; MACs = convolutions and linears
counted by :mod:`torch.utils.flop_counter` plus the scan formula of :func:`gspn.ops.scan_flops`;
see :func:`gspn.models.complexity`):

=========== ============= ======= ========= ================ ============== ==========
model       depths        C       d_state   global stages    params         GMACs
=========== ============= ======= ========= ================ ============== ==========
gspn_t      2, 2, 7, 2    96      8         3, 4             31,510,268     5.30
gspn_s      5, 5, 10, 2   108     16        4                50,773,346     12.03
gspn_b      4, 4, 15, 4   120     8         3 (8/15), 4      93,061,108     15.86
=========== ============= ======= ========= ================ ============== ==========

The paper's table lists 30M / 50M / 89M parameters (units of 2²⁰) and 5.3 / 9.0 / 15.9 GMACs.
**GSPN-S here follows the released ``small`` configuration (12.03 GMACs), not the paper's 9.0
GMACs model**, whose exact configuration is not published.

Pretrained weights: ``pretrained=True`` loads the authors' ImageNet-1K checkpoint of GSPN-T/S/B from
the Hugging Face Hub (``whj363636/GSPN``; **the authors report** 83.0 / 83.8 / 84.3 % top-1 at 224²,
not measured here) and builds the model with the reference semantics so it computes what the
reference computes; ``pretrained="tiny.pth"`` does the same from a local file, and a path to one of
our ``.safetensors`` files loads it (see :mod:`gspn.models.reference_checkpoints`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..nn import GSPNBlock, LayerNorm2d
from ._builder import build_model_with_cfg, record_head_args
from ._features import feature_indices
from ._registry import register_model
from .gspn_vision_keys import HF_HUB_ID

__all__ = ["GLOBAL_POOLS", "ClassifierAPI", "ClassifierHead", "GSPNClassifier", "block_chunk_sizes"]

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

#: The ``global_pool`` values of the classifiers: ``"avg"`` (mean over positions) or ``""`` (none).
GLOBAL_POOLS = ("avg", "")


def check_global_pool(global_pool: str, who: str = "GSPN classifiers") -> str:
    """``global_pool`` if it is one of :data:`GLOBAL_POOLS`, else ``ValueError``."""
    if not isinstance(global_pool, str) or global_pool not in GLOBAL_POOLS:
        raise ValueError(
            f"global_pool={global_pool!r} is not supported: {who} pool by 'avg' or not at all ('', as timm)"
        )
    return global_pool


def block_chunk_sizes(
    depths: Sequence[int],
    global_stages: Sequence[int],
    local_chunk_size: int | None = 2,
    global_period: int = 7,
    global_chunk_sizes: Sequence[int | None] | None = None,
) -> list[list[int | None]]:
    """Scan chunk size of every block: the global chunk of its stage, or ``local_chunk_size``.

    In a stage listed in ``global_stages`` (0-based), block ``d`` is global if
    ``d < global_period`` or ``(d + 1) % global_period == 0``; all other blocks are local. A global
    block's chunk is ``None`` (the whole map, whatever its size) unless ``global_chunk_sizes`` gives
    one per stage (the reference code's "global": the stage's configured feature size, e.g.
    ``(56, 28, 14, 7)`` for 224² — the whole map only at that input size).

    >>> block_chunk_sizes([2, 9], global_stages=[1])
    [[2, 2], [None, None, None, None, None, None, None, 2, 2]]
    """
    out = []
    for stage, depth in enumerate(depths):
        glob = stage in global_stages
        whole = None if global_chunk_sizes is None else global_chunk_sizes[stage]
        out.append(
            [
                whole if glob and (d < global_period or (d + 1) % global_period == 0) else local_chunk_size
                for d in range(depth)
            ]
        )
    return out


class Stem(nn.Module):
    """Patch embedding: conv3×3 s2 → LN → GELU → conv3×3 s2 → LN. ``(B, in, H, W) → (B, C, ⌈H/4⌉, ⌈W/4⌉)``."""

    def __init__(self, in_chans: int, dim: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1)
        self.norm1 = LayerNorm2d(dim // 2, eps=norm_eps)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1)
        self.norm2 = LayerNorm2d(dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))


class Downsample(nn.Module):
    """conv3×3 s2 → LN. ``(B, C_in, H, W) → (B, C_out, ⌈H/2⌉, ⌈W/2⌉)``."""

    def __init__(self, in_dim: int, out_dim: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1)
        self.norm = LayerNorm2d(out_dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class GSPNStage(nn.Module):
    """Optional downsample, then GSPN blocks on channels-last maps. ``(B, C_in, H, W) → (B, C, H', W')``."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        chunk_sizes: Sequence[int | None],
        drop_paths: Sequence[float],
        downsample: bool,
        norm_eps: float = 1e-6,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        self.downsample = Downsample(in_dim, dim, norm_eps) if downsample else nn.Identity()
        self.blocks = nn.Sequential(
            *[
                GSPNBlock(dim, chunk_size=cs, drop_path=dp, norm_eps=norm_eps, **block_kwargs)
                for cs, dp in zip(chunk_sizes, drop_paths, strict=True)
            ]
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x).permute(0, 2, 3, 1)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x.permute(0, 3, 1, 2)


class ClassifierHead(nn.Module):
    """LN → global average pool → dropout → Linear. ``(B, C, H, W) → (B, num_classes)``.

    ``global_pool=""`` (timm's "no pooling"): LN → dropout → the Linear at every position, giving
    ``(B, num_classes, H, W)`` maps, or with ``tokens=True`` (the isotropic encoders, as timm's ViT)
    the token sequence ``(B, H·W, num_classes)`` (row-major positions). With ``num_classes == 0``
    the Linear is the identity: the normalised map ``(B, C, H, W)`` / tokens ``(B, H·W, C)``.
    ``pre_logits`` returns the (pooled or unpooled) normalised features before dropout and Linear.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        drop_rate: float = 0.0,
        norm_eps: float = 1e-6,
        global_pool: str = "avg",
        tokens: bool = False,
    ) -> None:
        super().__init__()
        self.global_pool = check_global_pool(global_pool)
        self.tokens = tokens
        self.norm = LayerNorm2d(dim, eps=norm_eps)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x)
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        elif self.tokens:
            x = x.flatten(2).transpose(1, 2)  # (B, H·W, C)
        elif pre_logits or isinstance(self.fc, nn.Identity):
            return x if pre_logits else self.drop(x)
        else:  # the Linear on every pixel of the map: a 1×1 convolution with the same weights
            return self.fc(self.drop(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x if pre_logits else self.fc(self.drop(x))


class ClassifierAPI:
    """The timm-style classifier methods shared by :class:`GSPNClassifier` and
    :class:`~gspn.models.gspn_vit.GSPNViT`: the model has ``head`` (a :class:`ClassifierHead`),
    ``num_features``, ``num_classes``, ``default_cfg``, ``model_args`` and ``forward_features``."""

    head: ClassifierHead
    num_features: int
    num_classes: int
    default_cfg: dict[str, Any]
    model_args: dict[str, Any]

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """Alias of :attr:`default_cfg` (timm's newer name)."""
        return self.default_cfg

    def no_weight_decay(self) -> set[str]:
        """Names of parameters conventionally excluded from weight decay (norms, biases, GRN, merger)."""
        return {n for n, p in self.named_parameters() if p.ndim <= 1 or n.endswith("m_conv.weight")}

    def get_classifier(self) -> nn.Module:
        """The final Linear (or ``Identity`` when ``num_classes == 0``)."""
        return self.head.fc

    @property
    def global_pool(self) -> str:
        """The head's pooling: ``"avg"`` or ``""`` (none; see :class:`ClassifierHead`)."""
        return self.head.global_pool

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a fresh one for ``num_classes`` outputs (0 = no Linear).

        ``global_pool`` follows timm: ``None`` keeps the pooling, ``"avg"`` mean-pools, ``""`` removes
        the pooling (``reset_classifier(0, "")``: :meth:`forward` returns the normalised final map,
        or the token sequence of an isotropic encoder; see :class:`ClassifierHead`); anything else
        raises ``ValueError``. ``model_args`` and ``default_cfg`` follow.
        """
        if global_pool is not None:
            self.head.global_pool = check_global_pool(global_pool)
        self.num_classes = num_classes
        norm = self.head.norm
        ref = norm.weight if isinstance(norm, nn.LayerNorm) else next(self.parameters())
        if num_classes > 0:
            self.head.fc = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            self._init_weights(self.head.fc)
        else:
            self.head.fc = nn.Identity()
        if self.default_cfg:
            self.default_cfg["num_classes"] = num_classes
        record_head_args(self.model_args, num_classes, global_pool)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Head on :meth:`forward_features` output ``(B, C, h, w)``: pooled ``(B, num_features)`` if
        ``pre_logits`` else logits ``(B, num_classes)``; with ``global_pool=""`` unpooled (see
        :class:`ClassifierHead`)."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W) → (B, num_classes)`` (unpooled with ``global_pool=""``)."""
        return self.forward_head(self.forward_features(x))

    _trunk: str  # the attribute holding the feature levels: "stages" or "blocks"

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """timm's pruning for feature extraction: drop the levels after the last of ``indices``.

        What :class:`~gspn.models.FeatureListNet` calls (``prune_norm=True``); afterwards the model
        serves ``forward_intermediates`` only (``feature_info`` still lists every level, as timm's).

        Args:
            indices: the levels that will be taken (as in ``forward_intermediates``).
            prune_norm: remove the head's LayerNorm (the final norm).
            prune_head: ``reset_classifier(0, "")``.

        Returns:
            the taken levels, sorted non-negative indices (valid in the pruned model).

        Raises:
            IndexError: an index outside ``[-n, n)`` or a count outside ``[1, n]``.
        """
        trunk = getattr(self, self._trunk)
        take = feature_indices(indices, len(trunk), "level")
        if not take:
            raise IndexError("indices selects no level to keep")
        setattr(self, self._trunk, trunk[: take[-1] + 1])
        if prune_head:
            self.reset_classifier(0, "")
        if prune_norm:
            self.head.norm = nn.Identity()
        return take


class GSPNClassifier(ClassifierAPI, nn.Module):
    """GSPN image classifier (the backbone of GSPN-T/S/B).

    Args:
        num_classes: classifier outputs; ``0`` gives pooled features.
        in_chans: input channels.
        embed_dim: width ``C`` of stage 1; stage ``i`` has ``C·2^i`` channels.
        depths: blocks per stage.
        d_state: proxy dimension of the GSPN modules.
        expand: mixer expansion (``d_inner = expand · width``).
        mlp_ratio: MLP expansion.
        kernel_size: depthwise conv size in the mixer.
        local_chunk_size: scan tile of local blocks (``None`` makes every block global).
        global_stages: 0-based stages whose blocks follow the global rule of :func:`block_chunk_sizes`.
        global_period: period of that rule (7).
        gate_group_size: channels sharing one propagation gate (1 = per channel, GSPN-1; larger =
            GSPN-2's gate sharing; must divide every stage's ``d_inner``, or its propagation
            channels in the compact mode). ``None`` (default): 1, or, in the compact mode, one gate
            shared by all propagation channels.
        propagation_channels: compact channel propagation (:class:`~gspn.nn.GSPN2d`): ``None``
            (default) propagates all ``d_inner`` channels; an int ``Cp`` gives every stage's GSPN
            layers a ``Cp``-channel proxy space; a sequence gives one value (or ``None``) per stage.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linearly increasing over blocks up to this value
            (reference training: 0.2 / 0.4 / 0.5 for T / S / B).
        norm_eps: LayerNorm epsilon (every LayerNorm: stem, downsamples, blocks, mixer, head).
        backend: scan backend (see :func:`gspn.ops.line_scan`).
        conv_act: SiLU after the mixers' depthwise conv (see :class:`~gspn.nn.GSPNMixer`).
        merge_frame: ``"image"`` (aligned merge) or ``"scan"`` (the reference's merge in scan
            frames; square inputs only), see :class:`~gspn.nn.GSPN2d`.
        global_chunk_sizes: per stage, the chunk of the global blocks; ``None`` = the whole map
            (see :func:`block_chunk_sizes`).
        fused: GSPN layers as the fused operator :func:`gspn.ops.gspn_mix` (default) or as the
            materialising composition (``False``; same weights and numbers, slower).
        global_pool: ``"avg"`` (default) or ``""``: no pooling, ``forward`` returns the normalised
            final map ``(B, C, h, w)`` (per-pixel logits ``(B, num_classes, h, w)`` when
            ``num_classes > 0``), as timm's ``global_pool=''``.

    The reference code's semantics (the authors' checkpoints) are ``norm_eps=1e-5,
    conv_act=False, merge_frame="scan", global_chunk_sizes=(56, 28, 14, 7)``
    (:func:`gspn.models.reference_checkpoints.reference_model_args`); ``create_model`` applies them
    when it loads a reference checkpoint.

    Shapes: ``(B, in_chans, H, W) → (B, num_classes)`` for any ``H, W`` (square with
    ``merge_frame="scan"``).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 7, 2),
        d_state: int = 8,
        expand: float = 1.5,
        mlp_ratio: float = 4.0,
        kernel_size: int = 7,
        local_chunk_size: int | None = 2,
        global_stages: Sequence[int] = (2, 3),
        global_period: int = 7,
        gate_group_size: int | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        backend: str = "auto",
        conv_act: bool = True,
        merge_frame: str = "image",
        global_chunk_sizes: Sequence[int | None] | None = None,
        fused: bool = True,
        propagation_channels: int | Sequence[int | None] | None = None,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        check_global_pool(global_pool)
        dims = [embed_dim * 2**i for i in range(len(depths))]
        if propagation_channels is None or isinstance(propagation_channels, int):
            stage_props: list[int | None] = [propagation_channels] * len(depths)
        else:
            stage_props = list(propagation_channels)
            if len(stage_props) != len(depths):
                raise ValueError(
                    f"propagation_channels needs one entry per stage ({len(depths)}), got {tuple(stage_props)}"
                )
        if global_chunk_sizes is not None and len(global_chunk_sizes) != len(depths):
            raise ValueError(
                f"global_chunk_sizes needs one entry per stage ({len(depths)}), got {tuple(global_chunk_sizes)}"
            )
        chunks = block_chunk_sizes(depths, global_stages, local_chunk_size, global_period, global_chunk_sizes)
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.num_classes = num_classes
        self.embed_dims = dims
        self.num_features = dims[-1]
        self.drop_rate = drop_rate
        self.chunk_sizes = chunks
        self.stem = Stem(in_chans, dims[0], norm_eps)
        stages, start, in_dim = [], 0, dims[0]
        for i, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
            d_inner = round(expand * dim)
            prop = stage_props[i]
            scan_channels = d_inner if prop is None else prop
            if gate_group_size is None:
                gate_channels = None
            elif gate_group_size <= 0 or scan_channels % gate_group_size:
                what = "d_inner" if prop is None else "propagation_channels"
                raise ValueError(
                    f"gate_group_size={gate_group_size} does not divide {what}={scan_channels} of stage {i}"
                )
            else:
                gate_channels = scan_channels // gate_group_size
            stages.append(
                GSPNStage(
                    in_dim,
                    dim,
                    chunks[i],
                    rates[start : start + depth],
                    downsample=i > 0,
                    norm_eps=norm_eps,
                    d_state=d_state,
                    expand=expand,
                    mlp_ratio=mlp_ratio,
                    kernel_size=kernel_size,
                    gate_channels=gate_channels,
                    backend=backend,
                    conv_act=conv_act,
                    merge_frame=merge_frame,
                    fused=fused,
                    propagation_channels=prop,
                )
            )
            start += depth
            in_dim = dim
        self.stages = nn.Sequential(*stages)
        self.feature_info = [
            {"num_chs": dim, "reduction": 4 * 2**i, "module": f"stages.{i}"} for i, dim in enumerate(dims)
        ]
        self.head = ClassifierHead(self.num_features, num_classes, drop_rate, norm_eps, global_pool)
        self.default_cfg: dict[str, Any] = {}
        self.model_args: dict[str, Any] = {}
        self.apply(self._init_weights)

    _trunk = "stages"

    @property
    def default_out_indices(self) -> tuple[int, ...]:
        """The stages ``features_only`` returns by default: all of them (timm's default)."""
        return tuple(range(len(self.feature_info)))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass to save memory."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W) → (B, num_features, ⌈H/32⌉, ⌈W/32⌉)``, before the head's norm."""
        return self.stages(self.stem(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs for dense tasks (timm-style).

        Args:
            x: ``(B, in_chans, H, W)``.
            indices: stages to return: ``None`` = all, an int ``n`` = the last ``n``, or a list of
                (possibly negative) stage indices.
            intermediates_only: return only the list (the stages after the last wanted one are
                not run).

        Returns:
            ``[(B, C·2^i, ⌈H/2^(i+2)⌉, ⌈W/2^(i+2)⌉) for each selected stage i]``, preceded by the
            :meth:`forward_features` output unless ``intermediates_only``.

        Raises:
            IndexError: an index outside ``[-4, 4)`` or a count outside ``[0, 4]`` (4 stages).
        """
        wanted = feature_indices(indices, len(self.stages), "stage")
        last = max(wanted, default=-1) if intermediates_only else len(self.stages) - 1
        outs = []
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            if i > last:
                break
            x = stage(x)
            if i in wanted:
                outs.append(x)
        return outs if intermediates_only else (x, outs)


# --- configurations and registry ------------------------------------------------------------------


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv1",
        "classifier": "head.fc",
        **kwargs,
    }


default_cfgs: dict[str, dict[str, Any]] = {
    # hf_hub_*: the authors' ImageNet-1K checkpoints (pretrained=True); reported_top1: the accuracy
    # the authors report for them at 224² (not measured here).
    "gspn_t": _cfg(
        reference_params=31_510_268,
        reference_gmacs=5.30,
        train_drop_path_rate=0.2,
        hf_hub_id=HF_HUB_ID,
        hf_hub_filename="tiny.pth",
        reported_top1=83.0,
    ),
    "gspn_s": _cfg(
        reference_params=50_773_346,
        reference_gmacs=12.03,
        train_drop_path_rate=0.4,
        hf_hub_id=HF_HUB_ID,
        hf_hub_filename="small.pth",
        reported_top1=83.8,
    ),
    "gspn_b": _cfg(
        reference_params=93_061_108,
        reference_gmacs=15.86,
        train_drop_path_rate=0.5,
        hf_hub_id=HF_HUB_ID,
        hf_hub_filename="base.pth",
        reported_top1=84.3,
    ),
    "gspn_micro": _cfg(input_size=(3, 64, 64), pool_size=(2, 2), crop_pct=1.0),
    "gspn_nano": _cfg(input_size=(3, 32, 32), pool_size=(1, 1), crop_pct=1.0),
}


_create_gspn = partial(build_model_with_cfg, GSPNClassifier, reference="classifier")


@register_model
def gspn_t(pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> GSPNClassifier:
    """GSPN-T: C=96, depths 2-2-7-2, d_state 8, stages 3-4 global. 31.51M params, 5.30 GMACs at 224²."""
    config = dict(embed_dim=96, depths=(2, 2, 7, 2), d_state=8, global_stages=(2, 3))
    return _create_gspn("gspn_t", pretrained, config, **kwargs)


@register_model
def gspn_s(pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> GSPNClassifier:
    """GSPN-S (released ``small`` config, not the paper's 9.0 GMACs model): C=108, depths 5-5-10-2,
    d_state 16, stage 4 global. 50.77M params, 12.03 GMACs at 224²."""
    config = dict(embed_dim=108, depths=(5, 5, 10, 2), d_state=16, global_stages=(3,))
    return _create_gspn("gspn_s", pretrained, config, **kwargs)


@register_model
def gspn_b(pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> GSPNClassifier:
    """GSPN-B: C=120, depths 4-4-15-4, d_state 8, stage 3 (8 of 15 blocks) and stage 4 global.
    93.06M params, 15.86 GMACs at 224²."""
    config = dict(embed_dim=120, depths=(4, 4, 15, 4), d_state=8, global_stages=(2, 3))
    return _create_gspn("gspn_b", pretrained, config, **kwargs)


@register_model
def gspn_micro(pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> GSPNClassifier:
    """GSPN-micro, for CPU training demos: C=32, depths 1-1-3-1, d_state 8, stages 3-4 global."""
    config = dict(embed_dim=32, depths=(1, 1, 3, 1), d_state=8, global_stages=(2, 3))
    return _create_gspn("gspn_micro", pretrained, config, **kwargs)


@register_model
def gspn_nano(pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> GSPNClassifier:
    """GSPN-nano, for tests and smoke runs: C=16, depths 1-1-1-1, d_state 4, stages 3-4 global."""
    config = dict(embed_dim=16, depths=(1, 1, 1, 1), d_state=4, global_stages=(2, 3))
    return _create_gspn("gspn_nano", pretrained, config, **kwargs)
