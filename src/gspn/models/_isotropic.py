"""The forward of the isotropic encoders (:class:`~gspn.models.GSPNViT`,
:class:`~gspn.models.VisionTransformer`): patch tokens, ``depth`` identical blocks on a channels-last
``(B, h, w, D)`` token grid, block outputs for dense tasks and distillation, gradient checkpointing.
The subclasses own the patch embedding (``_embed``), the ``blocks`` and the head.

Dense prediction, as timm's ViT: ``global_pool=""`` makes ``forward`` return the normalised token
sequence ``(B, h·w, D)`` (per-token logits when ``num_classes > 0``); ``create_model(name,
features_only=True)`` returns block outputs as ``(B, D, h, w)`` maps of reduction ``p`` (the patch
size), by default those of the last 3 blocks (timm's ``out_indices=3`` for ViTs)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._features import feature_indices
from .gspn_vision import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ClassifierAPI, ClassifierHead

__all__ = ["IsotropicEncoder", "isotropic_cfg"]


def isotropic_cfg(**kwargs: Any) -> dict[str, Any]:
    """The ``default_cfg`` of an isotropic ImageNet encoder (224², patch-embedding stem, ``head.fc``),
    updated with ``kwargs``."""
    return {
        "url": "",
        "task": "classification",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (14, 14),
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head.fc",
        **kwargs,
    }


class IsotropicEncoder(ClassifierAPI, nn.Module):
    """Base of the isotropic encoders: ``_embed`` (``(B, in_chans, H, W) → (B, h, w, D)``), then
    every block of ``self.blocks`` on ``(B, h, w, D)`` tokens."""

    blocks: nn.Sequential | nn.ModuleList
    grad_checkpointing: bool = False

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` → channels-last tokens ``(B, ⌈H/p⌉, ⌈W/p⌉, D)``."""
        raise NotImplementedError

    _trunk = "blocks"

    def _finish_init(
        self,
        embed_dim: int,
        depth: int,
        patch_size: int,
        num_classes: int,
        drop_rate: float,
        norm_eps: float,
        global_pool: str = "avg",
    ) -> None:
        """The end of a subclass's ``__init__``, after its embedding and blocks: ``feature_info``, the
        head, the timm attributes, and the weight initialisation of every module."""
        self.feature_info = [
            {"num_chs": embed_dim, "reduction": patch_size, "module": f"blocks.{i}"} for i in range(depth)
        ]
        self.head = ClassifierHead(embed_dim, num_classes, drop_rate, norm_eps, global_pool, tokens=True)
        self.grad_checkpointing = False
        self.default_cfg: dict[str, Any] = {}
        self.model_args: dict[str, Any] = {}
        self.apply(self._init_weights)

    @property
    def default_out_indices(self) -> int:
        """The blocks ``features_only`` returns by default: the last 3 (timm's ``out_indices=3`` for
        ViT-like models), or all of them when there are fewer."""
        return min(3, len(self.feature_info))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass to save memory."""
        self.grad_checkpointing = enable

    def _run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W) → (B, D, ⌈H/p⌉, ⌈W/p⌉)``, the last block's output before the head's norm."""
        x = self._embed(x)
        for block in self.blocks:
            x = self._run_block(block, x)
        return x.permute(0, 3, 1, 2)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Block outputs for dense tasks and per-block distillation (timm-style).

        Args:
            x: ``(B, in_chans, H, W)``.
            indices: blocks to return: ``None`` = all, an int ``n`` = the last ``n``, or a list of
                (possibly negative) block indices.
            intermediates_only: return only the list (the blocks after the last wanted one are
                not run).

        Returns:
            ``[(B, D, ⌈H/p⌉, ⌈W/p⌉) for each selected block]`` in block order, preceded by the
            :meth:`forward_features` output unless ``intermediates_only``.

        Raises:
            IndexError: an index outside ``[-depth, depth)`` or a count outside ``[0, depth]``.
        """
        wanted = set(feature_indices(indices, len(self.blocks)))
        last = max(wanted, default=-1) if intermediates_only else len(self.blocks) - 1
        outs = []
        x = self._embed(x)
        for i, block in enumerate(self.blocks):
            if i > last:
                break
            x = self._run_block(block, x)
            if i in wanted:
                outs.append(x.permute(0, 3, 1, 2))
        return outs if intermediates_only else (x.permute(0, 3, 1, 2), outs)
