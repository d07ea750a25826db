"""GSPN-DiT: class-conditional diffusion backbones with GSPN token mixing (GSPN-B/L/XL/2 and /4).

Architecture (a U-ViT-like stack of GSPN blocks; no attention, no positional embedding)::

    tokens  = PatchEmbed(x)                       (B, C, H, W) → (B, H/p, W/p, D)
    c       = TimestepEmbed(t) + LabelEmbed(y)    (B, D); label y = num_classes is the null class
    tokens  = tokens + c                          conditioning is *added* (no adaLN in the blocks)
    in:     depth//2 blocks, each output pushed on a skip stack
    mid:    1 block
    out:    depth//2 blocks; before each, x = Linear(concat(x, skip.pop()))   (2D → D, U-ViT skip)
    head:   LN → LN(no affine) modulated by adaLN(c) → Linear(D → p²·out_channels) → unpatchify

Block (channels-last residual stream ``x``)::

    x = x + DropPath(branch(LN(x)))
    branch: Linear(D→D) → depthwise 7×7 conv (bias) → GSPN2d(D, d_state)          (token mixing)
            → 1×1 conv(D→D) → depthwise 3×3 conv → z·ReLU(z) → Linear(D→D)         (channel mixing)

GSPN blocks are *local* (scans restart every ``local_chunk_size`` = 2 lines) except the last
``num_global_blocks`` = 2 out-blocks, which are **really global** (``chunk_size=None``: one scan
over the whole token grid). The reference code flags those blocks global but still runs them
local (research notes §11.2); here the flag is honoured.

**Reference semantics** (the authors' checkpoints; :func:`gspn.models.reference_checkpoints.
reference_model_args`): ``wiring="hidden_residual"`` — Mamba-style ``(hidden, residual)`` pairs::

    res = h (first block) or res + h;   h = branch(LN(res))          every block
    in-blocks push their branch output h; out-blocks first do h = Linear(concat(h, skip.pop()))
    head on LN(res + h)

— plus ``num_global_blocks=0`` (all blocks chunk 2), ``merge_frame="scan"`` (the GSPN merge in
scan frames, square grids only), ``norm_eps=1e-5`` and ``final_norm_eps=1e-6``.

The model predicts the noise ε and, with ``learn_sigma=True``, the interpolation ``v`` of the
learned variance (``out_channels = 2·in_channels``; channels ``[:C]`` = ε, ``[C:]`` = v).

Reference configurations on a 32×32×4 latent, 1000 classes (patch 2, ``d_state = hidden // 16``):

=============== ======= ====== ======= ============== =======================
model           hidden  depth  blocks  params         reference (notes §5.2)
=============== ======= ====== ======= ============== =======================
gspn_dit_b_2    900     30     31      144,016,356    144,016,356 (exact)
gspn_dit_l_2    1200    56     57      465,230,660    465,230,660 (exact)
gspn_dit_xl_2   1500    56     57      723,513,260    723,513,260 (exact)
=============== ======= ====== ======= ============== =======================

Any latent size that is a multiple of the patch works, square or not.
"""

from __future__ import annotations

import math
import os
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..nn import DropPath, GSPN2d
from ._builder import build_model_with_cfg
from ._registry import register_model

__all__ = ["WIRINGS", "GSPNDiT", "GSPNDiTBlock", "LabelEmbedder", "TimestepEmbedder", "timestep_embedding"]

WIRINGS = ("residual", "hidden_residual")


# --- conditioning ----------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps.

    ``emb[b] = [cos(t_b·f_0), …, cos(t_b·f_{h−1}), sin(t_b·f_0), …, sin(t_b·f_{h−1})]`` with
    ``h = dim // 2`` and ``f_i = max_period^(−i/h)`` (zero-padded to ``dim`` when odd).

    Shapes: ``t: (B,) → (B, dim)`` in float32.
    """
    half = dim // 2
    steps = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(steps * (-math.log(max_period) / half))
    angles = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def _per_sample(
    value: torch.Tensor | float, batch: int, device: torch.device, name: str, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``value`` as a ``(batch,)`` tensor on ``device``: a number, 0-d or ``(1,)`` tensor is broadcast."""
    v = torch.as_tensor(value, device=device, dtype=dtype)
    if v.ndim == 0 or v.shape == (1,):
        return v.reshape(1).expand(batch)
    if v.shape != (batch,):
        raise ValueError(
            f"{name} must be a number or a tensor of shape (), (1,) or (B,) = ({batch},); got shape {tuple(v.shape)}"
        )
    return v


class TimestepEmbedder(nn.Module):
    """Sinusoidal features → Linear → SiLU → Linear. ``t: (B,) → (B, D)``."""

    def __init__(self, dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.freq_dim).to(self.linear_1.weight.dtype)
        return self.linear_2(self.act(self.linear_1(emb)))


class LabelEmbedder(nn.Module):
    """Class-label table with an extra *null* class for classifier-free guidance.

    Row ``num_classes`` is the null (unconditional) label. During training each label is replaced
    by the null label with probability ``dropout_prob`` (label dropout). ``y: (B,) → (B, D)``.
    """

    def __init__(self, num_classes: int, dim: int, dropout_prob: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= dropout_prob < 1.0:
            raise ValueError(f"dropout_prob must be in [0, 1), got {dropout_prob}")
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    @property
    def null_label(self) -> int:
        """The label index of the unconditional (dropped) class."""
        return self.num_classes

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


# --- blocks ----------------------------------------------------------------------------------------


class GSPNDiTBlock(nn.Module):
    r"""Pre-norm residual GSPN block of GSPN-DiT, with an optional U-ViT long-skip input.

    ::

        x = Linear(concat(x, skip))        (only when built with ``long_skip=True``)
        x = x + DropPath(branch(LN(x)))
        branch: Linear → dw 7×7 conv → GSPN2d → 1×1 conv → dw 3×3 conv → z·ReLU(z) → Linear

    Args:
        dim: width ``D``.
        d_state: GSPN proxy dimension.
        chunk_size: ``None`` = global scan; ``k`` = local scans restarting every ``k`` lines.
        long_skip: build the ``2D → D`` skip projection (out-blocks).
        kernel_size: size of the first depthwise conv.
        drop_path: stochastic depth of the branch.
        norm_eps: LayerNorm epsilon.
        backend: scan backend.
        merge_frame: :class:`~gspn.nn.GSPN2d`'s merge (``"image"`` aligned, ``"scan"`` the reference's).
        fused: :class:`~gspn.nn.GSPN2d` as the fused operator (default) or the composition.
        propagation_channels: compact channel propagation of :class:`~gspn.nn.GSPN2d` (``None`` = off).

    Shapes: ``x, skip: (B, H, W, D) → (B, H, W, D)``.
    """

    def __init__(
        self,
        dim: int,
        d_state: int,
        chunk_size: int | None = 2,
        long_skip: bool = False,
        kernel_size: int = 7,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        backend: str = "auto",
        merge_frame: str = "image",
        fused: bool = True,
        propagation_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if long_skip else None
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.in_proj = nn.Linear(dim, dim, bias=False)
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.gspn = GSPN2d(
            dim,
            d_state=d_state,
            chunk_size=chunk_size,
            backend=backend,
            merge_frame=merge_frame,
            fused=fused,
            propagation_channels=propagation_channels,
        )
        self.out_conv = nn.Conv2d(dim, dim, 1, bias=False)
        self.out_dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    @property
    def is_global(self) -> bool:
        """Whether the GSPN scans of this block span the whole grid."""
        return self.gspn.is_global

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch on a normalised ``(B, H, W, D)`` input."""
        z = self.in_proj(x).permute(0, 3, 1, 2)
        z = self.gspn(self.conv(z))
        z = self.out_dwconv(self.out_conv(z))
        z = z * F.relu(z)
        return self.out_proj(z.permute(0, 2, 3, 1))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            if skip is None:
                raise ValueError("this block has a long skip: pass skip=")
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        return x + self.drop_path(self.branch(self.norm(x)))

    def forward_hidden_residual(
        self, h: torch.Tensor, res: torch.Tensor | None, skip: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference wiring (``wiring="hidden_residual"``): ``(h, res) → (branch(LN(res')), res')``.

        ``h = Linear(concat(h, skip))`` first when the block has a long skip; then
        ``res' = h`` if ``res is None`` (first block) else ``res + DropPath(h)``.
        """
        if self.skip_linear is not None:
            if skip is None:
                raise ValueError("this block has a long skip: pass skip=")
            h = self.skip_linear(torch.cat([h, skip], dim=-1))
        res = h if res is None else res + self.drop_path(h)
        return self.branch(self.norm(res)), res


class FinalLayer(nn.Module):
    """LN(no affine) modulated by ``adaLN(c)`` → Linear to patch pixels.

    Shapes: ``x: (B, H, W, D)``, ``c: (B, D)`` → ``(B, H, W, p²·C_out)``.
    """

    def __init__(self, dim: int, patch_size: int, out_channels: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None, None, :].chunk(2, dim=-1)
        return self.linear(self.norm(x) * (1 + scale) + shift)


# --- model -----------------------------------------------------------------------------------------


class GSPNDiT(nn.Module):
    """Class-conditional GSPN diffusion backbone (see the module docstring for the layout).

    Args:
        input_size: default latent/image side (only recorded in the config; any ``H, W`` that are
            multiples of ``patch_size`` work at run time).
        patch_size: ``p``.
        in_channels: ``C`` of the latent or image.
        hidden_size: width ``D``.
        depth: ``depth // 2`` in-blocks, one mid-block, ``depth // 2`` out-blocks.
        d_state: GSPN proxy dimension (default ``hidden_size // 16``).
        num_classes: number of classes; label ``num_classes`` is the null class.
        class_dropout_prob: label-dropout probability during training (classifier-free guidance).
        learn_sigma: also predict the variance interpolation (``out_channels = 2·in_channels``).
        local_chunk_size: scan tile of the local blocks.
        num_global_blocks: the last this many out-blocks scan globally.
        kernel_size: first depthwise conv size in each block.
        drop_path_rate: stochastic depth, increasing linearly over the blocks.
        norm_eps: epsilon of the blocks' LayerNorms and ``norm_f``.
        final_norm_eps: epsilon of the final layer's (non-affine) LayerNorm; ``None`` = ``norm_eps``.
        wiring: ``"residual"`` — pre-norm residual blocks ``x + branch(LN x)`` whose outputs feed the
            long skips (default); ``"hidden_residual"`` — the reference code's Mamba-style
            ``(hidden, residual)`` pairs, where the skips carry *branch outputs* (module docstring).
        merge_frame: :class:`~gspn.nn.GSPN2d`'s merge: ``"image"`` (aligned) or ``"scan"`` (the
            reference's; square token grids only).
        label_init_std: std of the class-embedding init (0.02 as in DiT; a larger value makes the
            label salient from the start, which helps tiny models trained briefly).
        cond_every_block: also add ``c`` to the tokens before every block (no parameters; the
            reference adds it once, at the input — the default).
        backend: scan backend.
        fused: GSPN layers as the fused operator :func:`gspn.ops.gspn_mix` (default) or as the
            materialising composition (``False``; same weights and numbers, slower).
        propagation_channels: compact channel propagation of every :class:`~gspn.nn.GSPN2d`
            (``None`` = off; an int ``Cp`` propagates in a ``Cp``-channel proxy space).

    Shapes: ``x: (B, C, H, W)``, ``t: (B,)`` (float or int), ``y: (B,)`` int64 →
    ``(B, out_channels, H, W)``.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 900,
        depth: int = 30,
        d_state: int | None = None,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        label_init_std: float = 0.02,
        cond_every_block: bool = False,
        learn_sigma: bool = True,
        local_chunk_size: int | None = 2,
        num_global_blocks: int = 2,
        kernel_size: int = 7,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        backend: str = "auto",
        final_norm_eps: float | None = None,
        wiring: str = "residual",
        merge_frame: str = "image",
        fused: bool = True,
        propagation_channels: int | None = None,
    ) -> None:
        super().__init__()
        half = depth // 2
        if num_global_blocks > half:
            raise ValueError(f"num_global_blocks={num_global_blocks} exceeds the {half} out-blocks")
        if wiring not in WIRINGS:
            raise ValueError(f"wiring must be one of {WIRINGS}, got {wiring!r}")
        self.wiring = wiring
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.hidden_size = hidden_size
        self.num_classes = num_classes
        self.d_state = d_state or max(hidden_size // 16, 1)
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        n_blocks = 2 * half + 1
        rates = [drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]

        def block(i: int, chunk: int | None, long_skip: bool) -> GSPNDiTBlock:
            return GSPNDiTBlock(
                hidden_size,
                self.d_state,
                chunk,
                long_skip,
                kernel_size,
                rates[i],
                norm_eps,
                backend,
                merge_frame,
                fused,
                propagation_channels,
            )

        self.in_blocks = nn.ModuleList([block(i, local_chunk_size, False) for i in range(half)])
        self.mid_block = block(half, local_chunk_size, False)
        self.out_blocks = nn.ModuleList(
            [
                block(half + 1 + i, None if i >= half - num_global_blocks else local_chunk_size, True)
                for i in range(half)
            ]
        )
        self.norm_f = nn.LayerNorm(hidden_size, eps=norm_eps)
        self.final_layer = FinalLayer(
            hidden_size, patch_size, self.out_channels, norm_eps if final_norm_eps is None else final_norm_eps
        )
        self.grad_checkpointing = False
        self.default_cfg: dict[str, Any] = {"input_size": (in_channels, input_size, input_size)}
        self.model_args: dict[str, Any] = {}
        self.label_init_std = label_init_std
        self.cond_every_block = cond_every_block
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier-uniform linears and patch embedding, N(0, 0.02) embeddings, zero output layer."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=self.label_init_std)
        nn.init.normal_(self.t_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(self.t_embedder.linear_2.weight, std=0.02)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """Alias of :attr:`default_cfg` (timm's newer name)."""
        return self.default_cfg

    @property
    def blocks(self) -> list[GSPNDiTBlock]:
        """All blocks in execution order (in, mid, out)."""
        return [*self.in_blocks, self.mid_block, *self.out_blocks]

    @property
    def null_label(self) -> int:
        """The unconditional class label (``num_classes``)."""
        return self.y_embedder.null_label

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass to save memory."""
        self.grad_checkpointing = enable

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, h, w, p·p·C_out) → (B, C_out, h·p, w·p)`` (any ``h, w``)."""
        b, h, w, _ = x.shape
        p, c = self.patch_size, self.out_channels
        x = x.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, h * p, w * p)

    def _run(self, blk: GSPNDiTBlock, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, x, skip, use_reentrant=False)
        return blk(x, skip)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        """``x: (B, C, H, W)``, ``t: (B,)``, ``y: (B,)`` → ``(B, out_channels, H, W)``.

        ``t`` (timesteps, integer or fractional) and ``y`` (labels) may also be a Python number, a
        0-d tensor or a ``(1,)`` tensor, broadcast to the batch as diffusers models do (diffusers
        sampling loops pass one timestep for the whole batch). ``t=None`` means timestep 0 and
        ``y=None`` the null (unconditional) label, so that ``model(x)`` works for shape checks and
        :func:`gspn.models.complexity`.

        Raises:
            ValueError: ``x`` is not ``(B, C, H, W)`` with ``H, W`` multiples of the patch, or ``t``
                / ``y`` has another shape than ``()``, ``(1,)`` or ``(B,)``.
        """
        p = self.patch_size
        if x.ndim != 4 or x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"expected (B, C, H, W) with H, W multiples of patch {p}, got {tuple(x.shape)}")
        batch = x.shape[0]
        t = _per_sample(0 if t is None else t, batch, x.device, "t (timestep)")
        y = _per_sample(self.null_label if y is None else y, batch, x.device, "y (label)", torch.long)
        c = self.t_embedder(t) + self.y_embedder(y)
        cb = c[:, None, None, :]
        h = self.x_embedder(x).permute(0, 2, 3, 1) + cb
        if self.wiring == "hidden_residual":
            return self.unpatchify(self.final_layer(self.norm_f(self._forward_hidden_residual(h, cb)), c))
        skips = []
        for blk in self.in_blocks:
            h = self._run(blk, h + cb if self.cond_every_block else h)
            skips.append(h)
        h = self._run(self.mid_block, h + cb if self.cond_every_block else h)
        for blk in self.out_blocks:
            h = self._run(blk, h + cb if self.cond_every_block else h, skips.pop())
        return self.unpatchify(self.final_layer(self.norm_f(h), c))

    def _forward_hidden_residual(self, h: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
        """The blocks with the reference wiring; returns the final residual stream ``res + h``."""

        def run(blk: GSPNDiTBlock, h: torch.Tensor, res: torch.Tensor | None, skip: torch.Tensor | None = None):
            if self.cond_every_block:
                h = h + cb
            if self.grad_checkpointing and torch.is_grad_enabled():
                return checkpoint(blk.forward_hidden_residual, h, res, skip, use_reentrant=False)
            return blk.forward_hidden_residual(h, res, skip)

        res, skips = None, []
        for blk in self.in_blocks:
            h, res = run(blk, h, res)
            skips.append(h)
        h, res = run(self.mid_block, h, res)
        for blk in self.out_blocks:
            h, res = run(blk, h, res, skips.pop())
        return res + h

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guided prediction.

        Runs the conditional (``y``) and unconditional (null label) passes as one batch of ``2B``
        and returns ``ε_u + s·(ε_c − ε_u)`` on **all** ``in_channels`` noise channels; the variance
        channels (``learn_sigma``) are the conditional ones. ``cfg_scale = 1`` is the plain
        conditional model.

        Shapes: ``x: (B, C, H, W)``, ``t: (B,)``, ``y: (B,)`` → ``(B, out_channels, H, W)``; ``t`` and
        ``y`` may be numbers or 0-d tensors, broadcast as in :meth:`forward`.
        """
        if cfg_scale == 1.0:
            return self.forward(x, t, y)
        t = _per_sample(t, x.shape[0], x.device, "t (timestep)")
        y = _per_sample(y, x.shape[0], x.device, "y (label)", torch.long)
        null = torch.full_like(y, self.null_label)
        out = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out.chunk(2)
        c = self.in_channels
        eps = uncond[:, :c] + cfg_scale * (cond[:, :c] - uncond[:, :c])
        return torch.cat([eps, cond[:, c:]], dim=1)

    def extra_repr(self) -> str:
        glob = sum(b.is_global for b in self.blocks)
        return (
            f"hidden={self.hidden_size}, blocks={len(self.blocks)} ({glob} global), "
            f"d_state={self.d_state}, patch={self.patch_size}, learn_sigma={self.learn_sigma}"
        )


# --- configurations and registry ------------------------------------------------------------------


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (4, 32, 32),
        "task": "diffusion",
        "first_conv": "x_embedder",
        "classifier": "final_layer.linear",
        **kwargs,
    }


default_cfgs: dict[str, dict[str, Any]] = {
    "gspn_dit_b_2": _cfg(reference_params=144_016_356),
    "gspn_dit_b_4": _cfg(),
    "gspn_dit_l_2": _cfg(reference_params=465_230_660),
    "gspn_dit_l_4": _cfg(),
    "gspn_dit_xl_2": _cfg(reference_params=723_513_260),
    "gspn_dit_xl_4": _cfg(),
    "gspn_dit_s_2": _cfg(),
    "gspn_dit_tiny": _cfg(num_classes=10, input_size=(1, 16, 16)),
    "gspn_dit_micro": _cfg(num_classes=10, input_size=(1, 16, 16)),
}


_create = partial(build_model_with_cfg, GSPNDiT, reference="generator")


@register_model
def gspn_dit_s_2(pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> GSPNDiT:
    """GSPN-DiT-S/2: hidden 368, depth 24 (+1 mid block), patch 2, d_state 23."""
    return _create("gspn_dit_s_2", pretrained, dict(hidden_size=368, depth=24, patch_size=2), **kwargs)


@register_model
def gspn_dit_b_2(pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> GSPNDiT:
    """GSPN-DiT-B/2: hidden 900, depth 30 (+1 mid block), patch 2, d_state 56."""
    return _create("gspn_dit_b_2", pretrained, dict(hidden_size=900, depth=30, patch_size=2), **kwargs)


@register_model
def gspn_dit_b_4(pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> GSPNDiT:
    """GSPN-DiT-B/4: hidden 900, depth 30 (+1 mid block), patch 4, d_state 56."""
    return _create("gspn_dit_b_4", pretrained, dict(hidden_size=900, depth=30, patch_size=4), **kwargs)


@register_model
def gspn_dit_l_2(pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> GSPNDiT:
    """GSPN-DiT-L/2: hidden 1200, depth 56 (+1 mid block), patch 2, d_state 75."""
    return _create("gspn_dit_l_2", pretrained, dict(hidden_size=1200, depth=56, patch_size=2), **kwargs)


@register_model
def gspn_dit_l_4(pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> GSPNDiT:
    """GSPN-DiT-L/4: hidden 1200, depth 56 (+1 mid block), patch 4, d_state 75."""
    return _create("gspn_dit_l_4", pretrained, dict(hidden_size=1200, depth=56, patch_size=4), **kwargs)


@register_model
def gspn_dit_xl_2(pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> GSPNDiT:
    """GSPN-DiT-XL/2: hidden 1500, depth 56 (+1 mid block), patch 2, d_state 93."""
    return _create("gspn_dit_xl_2", pretrained, dict(hidden_size=1500, depth=56, patch_size=2), **kwargs)


@register_model
def gspn_dit_xl_4(pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> GSPNDiT:
    """GSPN-DiT-XL/4: hidden 1500, depth 56 (+1 mid block), patch 4, d_state 93."""
    return _create("gspn_dit_xl_4", pretrained, dict(hidden_size=1500, depth=56, patch_size=4), **kwargs)


@register_model
def gspn_dit_tiny(pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> GSPNDiT:
    """Tiny CPU config for tests: hidden 64, depth 4 (5 blocks, 1 global), patch 2, d_state 8,
    1×16×16 input, 10 classes, class-embedding init std 1."""
    config = dict(
        input_size=16,
        in_channels=1,
        num_classes=10,
        hidden_size=64,
        depth=4,
        d_state=8,
        patch_size=2,
        num_global_blocks=1,
        label_init_std=1.0,
    )
    return _create("gspn_dit_tiny", pretrained, config, **kwargs)


@register_model
def gspn_dit_micro(pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> GSPNDiT:
    """CPU config of the digits demo: hidden 128, depth 6 (7 blocks, 2 global), patch 4, d_state 8,
    1×16×16 input, 10 classes, class-embedding init std 1 (labels are used from the first
    few hundred steps; with DiT's 0.02 a short CPU run learns to ignore them)."""
    config = dict(
        input_size=16,
        in_channels=1,
        num_classes=10,
        hidden_size=128,
        depth=6,
        d_state=8,
        patch_size=4,
        num_global_blocks=2,
        label_init_std=1.0,
    )
    return _create("gspn_dit_micro", pretrained, config, **kwargs)
