"""The GSPN module: input-dependent 4-direction line scans with a learnable, aligned merger."""

from __future__ import annotations

import torch
from torch import nn

from ..ops import DIRECTIONS, gspn_mix, line_scan, line_scan_4d
from ..ops.backends import check_backend
from ..ops.validation import check_chunk_size

__all__ = ["GSPN2d"]

_NUM_DIRECTIONS = len(DIRECTIONS)
_NUM_GATES = 3
MERGE_FRAMES = ("image", "scan")


def _is_plain_conv(module: nn.Module) -> bool:
    """A bias-free ``nn.Conv2d`` whose ``forward`` is its class's and that has no hooks: calling it
    computes exactly with ``module.weight``, so the weight may be read directly."""
    return (
        type(module) is nn.Conv2d
        and "forward" not in module.__dict__  # accelerate's hooks replace the instance's forward
        and not (module._forward_hooks or module._forward_pre_hooks)
        and module.bias is None
    )


def _affine_map(module: nn.Module, n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, b)`` of a per-pixel affine map ``P(z) = M z + b`` on ``n`` channels, by calling ``module``.

    ``P`` on the ``n`` basis vectors and on zero (a batch of ``n + 1`` 1×1 maps, ``like``'s dtype and
    device) gives ``Mᵀ + b`` and ``b``: through the module's ``forward``, so adapters, pruning masks,
    parametrizations and offload hooks act. Returns ``M (out, n)`` and ``b (out,)``, without any
    data-dependent branch.
    """
    basis = torch.cat([torch.eye(n, dtype=like.dtype, device=like.device), like.new_zeros(1, n)])
    out = module(basis.view(n + 1, n, 1, 1)).flatten(1)  # (n + 1, out)
    return (out[:n] - out[n:]).t(), out[n]


class GSPN2d(nn.Module):
    r"""Generalized Spatial Propagation on a ``(B, C, H, W)`` map.

    All propagation parameters are generated from the input through a small shared *proxy*::

        z        = W_down x                                  (C → d_state, 1×1, shared)
        a_k      = W_w z    (3 gate logits per direction)    (d_state → 4·3·Cg)
        λ_k, u_k, D_k = W_λ z, W_u z, W_D z                  (d_state → 4·C each)
        h_k      = line_scan(x, λ_k, stabilize(a_k), direction k)   k ∈ (tb, bt, lr, rl)
        y_k      = u_k ⊙ h_k + D_k ⊙ x
        y        = Σ_k m_k y_k                               (learnable merger, 4 weights)

    with the recurrence of :func:`gspn.ops.line_scan` and the stability–context normalisation of
    :func:`gspn.ops.stabilize` (the gates of the neighbours that exist are non-negative and sum to 1).

    **Alignment.** :func:`gspn.ops.line_scan_4d` returns every direction in the image frame, so
    ``y_k[..., r, c]`` is pixel ``(r, c)``'s result for every ``k`` and the merger combines like with
    like. (The reference code sums the transposed/flipped scans in their own frames; this module
    does so only with ``merge_frame="scan"``, for the authors' weights.) With a global scan the four
    causal cones of a pixel cover the whole image.

    **Compact channel propagation** (``propagation_channels=Cp``; GSPN-2 [P2], C-GSPN [P3]). The
    papers project the features to a small proxy channel space, propagate there with a set of
    channel-shared propagation weights and lift the result back. Here::

        x_p = W_in x                                         (C → Cp, 1×1, ``proj_in``, no bias)
        y_p = the layer above on x_p, with Cp channels and Cg gate channels (default Cg = 1)
        y   = W_out y_p                                      (Cp → C, 1×1, ``proj_out``, no bias)

    so the scan, λ, u and D cost ``O(Cp)`` per pixel instead of ``O(C)``. The papers give neither
    the proxy width nor the exact layout; **our choices** are: the propagation parameters are
    generated from the projected features (``x_conv_down`` maps ``Cp → d_state``), the gates are
    shared by all ``Cp`` channels unless ``gate_channels`` says otherwise (the papers' "channel-shared
    propagation weights"), λ, u and D stay per proxy channel, both projections are bias-free 1×1
    convolutions, and ``proj_out`` has PyTorch's default init.

    Args:
        channels: ``C``.
        d_state: proxy dimension (8 in GSPN-T/B, 16 in GSPN-S).
        chunk_size: ``None`` for global GSPN (one scan over the whole image); ``k`` restarts the
            scans at image-aligned tiles of ``k`` lines (local GSPN).
        gate_channels: number ``Cg`` of independent gate channels; must divide ``C``. ``None``
            (default) gives per-channel gates (GSPN-1); smaller values share each gate over a
            group of ``C / Cg`` channels (GSPN-2's compact channel propagation), shrinking
            ``W_w`` from ``12·C`` to ``12·Cg`` outputs. With ``propagation_channels`` it must divide
            ``Cp`` instead, and ``None`` means ``Cg = 1`` (every proxy channel shares the gates).
        backend: backend of :func:`gspn.ops.gspn_mix` (or of the scans when ``fused=False``).
        fused: ``True`` (default) runs the layer after ``x_conv_down`` as one fused operator,
            :func:`gspn.ops.gspn_mix`, which never stores the per-pixel parameter maps (5–6× faster
            on CPU). ``False`` runs the materialising composition (four 1×1 up-projections,
            :func:`gspn.ops.line_scan_4d`, gating, merge): the same numbers up to rounding, kept as
            the benchmark baseline. Parameters and ``state_dict`` keys are the same either way.
        merge_frame: ``"image"`` (default) merges the four directions' results of the same pixel
            (the alignment above). ``"scan"`` reproduces the reference code (NVlabs/GSPN): each
            direction ``k`` scans a transposed/flipped copy ``X_k`` of ``x`` (its *scan frame*:
            ``lr`` ← ``x``, ``tb`` ← ``xᵀ``, ``rl`` ← ``x`` flipped left-right, ``bt`` ← ``xᵀ``
            flipped) left to right, with λ, u, D and the gates used at the frame index as computed
            in the image frame, gates normalised as the reference does (their sum over the existing
            neighbours clamped at 1e-7), ``y_k = u_k ⊙ h_k + D_k ⊙ X_k``, and the merger adds the four
            ``y_k`` without undoing the transpose/flip (so pixel ``(i, j)`` sums results of four
            different pixels). Chunks are left-aligned in each frame. Needs ``H == W``; runs on
            :func:`gspn.ops.line_scan` (every backend). Used for the authors' checkpoints.
        propagation_channels: ``None`` (default): propagate all ``C`` channels (GSPN-1; exactly the
            parameters and ``state_dict`` keys of earlier versions). An int ``Cp ≥ 1``: compact
            channel propagation (above), which adds the parameters ``proj_in.weight (Cp, C, 1, 1)``
            and ``proj_out.weight (C, Cp, 1, 1)`` and sizes every other weight by ``Cp``.

    **Submodules.** Every projection is used by calling it, so whatever acts through a module's
    ``forward`` acts here: peft adapters (LoRA on any projection), ``torch.nn.utils.prune``,
    parametrizations, accelerate's CPU offload, meta-device construction with
    ``load_state_dict(assign=True)``. The fused path needs each projection's matrix: it calls the
    projection on the ``S`` basis vectors of the proxy space (a batch of ``S`` 1×1 maps; ``P(E) = Mᵀ``
    for a per-pixel linear ``P``; a constant term becomes the weight of an extra proxy channel of
    ones), which costs ``O(S²·C)`` per call; plain bias-free ``nn.Conv2d`` projections without hooks
    are read directly (the same numbers). It takes the materialising path — exact for any module —
    when a projection has forward hooks or pre-hooks (they see the real ``(B, ·, H, W)`` activations
    there) or a dropout in training mode (a LoRA dropout draws a mask per pixel). A projection is
    assumed to be affine and to act on each pixel's vector separately, as a 1×1 convolution (or an
    adapter on one) does. Global hooks (``register_module_forward_hook``) do not see plain
    projections in the fused path.

    Raises:
        ValueError: a bad ``merge_frame``, ``chunk_size``, ``propagation_channels``, or a
            ``gate_channels`` that does not divide the propagated channels; at call time, an input
            that is not ``(B, C, H, W)``.

    Shapes: ``(B, C, H, W) → (B, C, H, W)``; any ``H, W ≥ 1``.

    Example:
        >>> import torch
        >>> from gspn.nn import GSPN2d
        >>> GSPN2d(16, d_state=4)(torch.randn(2, 16, 9, 13)).shape
        torch.Size([2, 16, 9, 13])
        >>> GSPN2d(64, d_state=4, propagation_channels=8)(torch.randn(2, 64, 9, 13)).shape  # compact
        torch.Size([2, 64, 9, 13])
    """

    def __init__(
        self,
        channels: int,
        d_state: int = 8,
        chunk_size: int | None = None,
        gate_channels: int | None = None,
        backend: str = "auto",
        merge_frame: str = "image",
        fused: bool = True,
        propagation_channels: int | None = None,
    ) -> None:
        super().__init__()
        if merge_frame not in MERGE_FRAMES:
            raise ValueError(f"merge_frame must be one of {MERGE_FRAMES}, got {merge_frame!r}")
        self.merge_frame = merge_frame
        if propagation_channels is not None and (
            isinstance(propagation_channels, bool)
            or not isinstance(propagation_channels, int)
            or propagation_channels <= 0
        ):
            raise ValueError(f"propagation_channels must be None or a positive int, got {propagation_channels!r}")
        compact = propagation_channels is not None
        scan_channels = propagation_channels if compact else channels
        gate_channels = (1 if compact else channels) if gate_channels is None else gate_channels
        if gate_channels <= 0 or scan_channels % gate_channels:
            what = f"propagation_channels={scan_channels}" if compact else f"channels={channels}"
            raise ValueError(f"gate_channels must be a positive divisor of {what}, got {gate_channels}")
        chunk_size = check_chunk_size(chunk_size)  # the operators' own rule, checked at construction
        check_backend(backend)
        if isinstance(d_state, bool) or not isinstance(d_state, int) or d_state <= 0:
            raise ValueError(f"d_state must be a positive int, got {d_state!r}")
        self.channels = channels
        self.d_state = d_state
        self.chunk_size = chunk_size
        self.gate_channels = gate_channels
        self.backend = backend
        self.fused = fused
        self.propagation_channels = propagation_channels
        self.scan_channels = scan_channels
        nd = _NUM_DIRECTIONS
        # Registered only in the compact mode, so that the default layer keeps its state_dict keys.
        self.proj_in: nn.Conv2d | None = nn.Conv2d(channels, scan_channels, 1, bias=False) if compact else None
        self.x_conv_down = nn.Conv2d(scan_channels, d_state, 1, bias=False)
        self.w_conv_up = nn.Conv2d(d_state, nd * _NUM_GATES * gate_channels, 1, bias=False)
        self.l_conv_up = nn.Conv2d(d_state, nd * scan_channels, 1, bias=False)
        self.u_conv_up = nn.Conv2d(d_state, nd * scan_channels, 1, bias=False)
        self.d_conv = nn.Conv2d(d_state, nd * scan_channels, 1, bias=False)
        self.m_conv = nn.Conv2d(nd, 1, 1, bias=False)
        self.proj_out: nn.Conv2d | None = nn.Conv2d(scan_channels, channels, 1, bias=False) if compact else None
        nn.init.constant_(self.m_conv.weight, 1.0 / nd)  # start as the mean of the four directions

    @property
    def is_global(self) -> bool:
        """Whether the scans run over the whole image (``chunk_size is None``)."""
        return self.chunk_size is None

    @property
    def is_compact(self) -> bool:
        """Whether the layer propagates in a projected channel space (``propagation_channels`` set)."""
        return self.propagation_channels is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, C, H, W) → (B, C, H, W)``."""
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"x must be (B, C, H, W) with C = {self.channels} channels, got input of shape {tuple(x.shape)}"
            )
        if self.proj_in is not None:
            x = self.proj_in(x)
        if self.merge_frame == "scan":
            y = self._forward_scan_frames(x)
        elif self.fused and ((plain := self._plain_projections()) or self._projections_fusable()):
            z = self.x_conv_down(x)
            offset = None
            if plain:
                weights = self._weight_views()
            else:
                *weights, offset = self._adapted_weights(z)
                z = torch.cat([z, z.new_ones(z.shape[0], 1, *z.shape[2:])], dim=1)  # the constant terms' channel
            weights = tuple(w.to(x.dtype) for w in weights)
            y = gspn_mix(x, z.to(x.dtype), *weights, chunk_size=self.chunk_size, backend=self.backend)
            if offset is not None:
                y = y + offset.to(y.dtype)
        else:
            y = self._forward_unfused(x)
        return y if self.proj_out is None else self.proj_out(y)

    def mix_weights(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
        """The layer's projections as the weight arguments of :func:`gspn.ops.gspn_mix`.

        Each projection is *called* (see the class doc, "Submodules") on the standard basis of the
        proxy space, so adapters, parametrizations and offload hooks are included, and the results
        are differentiable with respect to the modules' parameters.

        Returns:
            ``gate_weight (4, 3, Cg, S)``, ``lam_weight``, ``u_weight``, ``skip_weight`` ``(4, Cs, S)``
            and ``merge_weight (4,)`` with ``Cs = scan_channels``, in ``dtype`` (default: the dtype
            the projections compute in), on the device of ``x_conv_down``'s weight.

        Raises:
            ValueError: a projection is affine, not linear (it maps zero to a non-zero value), so
                it has no weight matrix (the layer's forward handles it: see :meth:`_adapted_weights`).
        """
        ref = next(self.x_conv_down.parameters())
        probe = torch.empty(0, self.d_state, 1, 1, dtype=ref.dtype, device=ref.device)
        *generation, merge, merge_offset = self._adapted_weights(probe)
        constants = [w[..., -1] for w in generation] + [merge_offset]
        if probe.device.type != "meta" and any(bool(t.ne(0).any()) for t in constants):
            raise ValueError("a projection of this GSPN2d has a constant term, so it has no weight matrix")
        weights = [w[..., :-1] for w in generation] + [merge]
        return tuple(weights) if dtype is None else tuple(w.to(dtype) for w in weights)

    def _projections_fusable(self) -> bool:
        """Whether the fused path computes exactly what calling the projections per pixel computes.

        Not when a projection (or a module inside it) has forward hooks — they must see the real
        per-pixel activations — or is stochastic (dropout in training mode, e.g. a LoRA dropout).
        """
        for proj in (self.w_conv_up, self.l_conv_up, self.u_conv_up, self.d_conv, self.m_conv):
            for m in proj.modules():
                if m._forward_hooks or m._forward_pre_hooks:
                    return False
                if m.training and isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
                    return False
        return True

    def _plain_projections(self) -> bool:
        """Whether every projection is a plain bias-free ``nn.Conv2d`` (:func:`_is_plain_conv`)."""
        d = self._modules
        return all(_is_plain_conv(d[n]) for n in ("w_conv_up", "l_conv_up", "u_conv_up", "d_conv", "m_conv"))

    def _weight_views(self) -> tuple[torch.Tensor, ...]:
        """The :func:`gspn_mix` weights as views of plain projections' weights: exactly what calling
        them on the basis gives (:meth:`_adapted_weights`), without the calls (~0.05 ms a layer)."""
        nd, c, s = _NUM_DIRECTIONS, self.scan_channels, self.d_state
        return (
            self.w_conv_up.weight.view(nd, _NUM_GATES, self.gate_channels, s),
            self.l_conv_up.weight.view(nd, c, s),
            self.u_conv_up.weight.view(nd, c, s),
            self.d_conv.weight.view(nd, c, s),
            self.m_conv.weight.view(nd),
        )

    def _adapted_weights(self, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The :func:`gspn_mix` weights of projections that are not plain convolutions, by calling them.

        Each projection ``P(z) = M z + b`` (a 1×1 convolution with or without bias, LoRA or DoRA
        adapter, pruning mask, weight parametrization or accelerate hook) is read by
        :func:`_affine_map`. The result needs no data-dependent branch (``vmap`` over parameters and
        ``torch.compile`` with ``fullgraph=True`` work): ``b`` becomes an extra column, the weight of
        a constant proxy channel of ones (:meth:`forward` appends it to ``z``).

        Args:
            z: the proxy (or an empty tensor of its dtype and device).

        Returns:
            ``gate (4, 3, Cg, S+1)``, ``lam``, ``u``, ``skip`` ``(4, Cs, S+1)``, ``merge (4,)`` and
            ``merge_offset (1,)`` (the merger's constant term, added to the merged output).
        """
        nd, c, s = _NUM_DIRECTIONS, self.scan_channels, self.d_state
        gate, lam, u, skip = (
            torch.cat([m, b.unsqueeze(1)], dim=1)  # (out, S + 1): [M | b]
            for m, b in (_affine_map(p, s, z) for p in (self.w_conv_up, self.l_conv_up, self.u_conv_up, self.d_conv))
        )
        merge, merge_offset = _affine_map(self.m_conv, nd, z)  # (1, 4), (1,)
        return (
            gate.reshape(nd, _NUM_GATES, self.gate_channels, s + 1),
            lam.reshape(nd, c, s + 1),
            u.reshape(nd, c, s + 1),
            skip.reshape(nd, c, s + 1),
            merge.reshape(nd),
            merge_offset,
        )

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        """The merger ``m_conv`` (4 → 1 over the direction axis) on ``y (B, 4, C, H, W) → (B, C, H, W)``.

        Without hooks on ``m_conv`` its weights come from :func:`_affine_map` (or its weight, if plain)
        and the merge is a ``(1, 4) @ (B, 4, C·H·W)`` matmul (several times faster than a 4-channel conv on CPU); with
        hooks, ``m_conv`` is called on the maps themselves.
        """
        b, nd, c, h, w = y.shape
        if self.m_conv._forward_hooks or self.m_conv._forward_pre_hooks or type(self.m_conv) is not nn.Conv2d:
            return self.m_conv(y.reshape(b, nd, c * h, w)).view(b, c, h, w)
        if _is_plain_conv(self.m_conv):
            m = self.m_conv.weight.view(1, nd).to(y.dtype)
            return torch.matmul(m, y.reshape(b, nd, c * h * w)).view(b, c, h, w)
        m, offset = _affine_map(self.m_conv, nd, y)  # e.g. a bias, or an accelerate hook
        return (torch.matmul(m, y.reshape(b, nd, c * h * w)) + offset).view(b, c, h, w)

    def _forward_unfused(self, x: torch.Tensor) -> torch.Tensor:
        """``fused=False``: every per-pixel parameter map materialised, then ``line_scan_4d``.
        ``x: (B, Cs, H, W) → (B, Cs, H, W)``."""
        b, c, h, w = x.shape
        nd = _NUM_DIRECTIONS
        x = x.contiguous()  # the scan needs dense (H, W) planes; channels-last input is copied once here
        z = self.x_conv_down(x)
        gates = self.w_conv_up(z).view(b, nd, _NUM_GATES, self.gate_channels, h, w)
        lam = self.l_conv_up(z).view(b, nd, c, h, w)
        u = self.u_conv_up(z).view(b, nd, c, h, w)
        skip = self.d_conv(z).view(b, nd, c, h, w)
        hidden = line_scan_4d(
            x,
            lam,
            gates[:, :, 0],
            gates[:, :, 1],
            gates[:, :, 2],
            chunk_size=self.chunk_size,
            normalize=True,
            backend=self.backend,
        )
        return self._merge(torch.addcmul(u * hidden, skip, x.unsqueeze(1)))  # (B, 4, C, H, W) merged

    def _forward_scan_frames(self, x: torch.Tensor) -> torch.Tensor:
        """``merge_frame="scan"`` (the reference's semantics): ``x: (B, Cs, H, W) → (B, Cs, H, W)``, ``H == W``."""
        b, c, h, w = x.shape
        if h != w:
            raise ValueError(
                f"merge_frame='scan' (the reference's semantics) needs a square map, got {h}x{w}: the "
                "transposed scan frames must have the shape of the parameters"
            )
        nd = _NUM_DIRECTIONS
        x = x.contiguous()
        z = self.x_conv_down(x)
        gates = self.w_conv_up(z).view(b, nd, _NUM_GATES, self.gate_channels, h, w)
        lam = self.l_conv_up(z).view(b, nd, c, h, w)
        u = self.u_conv_up(z).view(b, nd, c, h, w)
        skip = self.d_conv(z).view(b, nd, c, h, w)
        # The reference's gate normalisation: sigmoids over the sum of the existing neighbours'
        # sigmoids (frame row i−1 exists for i > 0, row i+1 for i < H−1), the sum clamped at 1e-7 —
        # unlike gspn.ops.stabilize, the gates of a saturated pixel then sum to less than 1.
        rows = torch.arange(h, device=x.device).view(h, 1)
        has_prev, has_next = rows > 0, rows < h - 1
        frames = {"lr": x, "tb": x.transpose(2, 3), "rl": x.flip(-1), "bt": x.transpose(2, 3).flip(-1)}
        ys = []
        for k, direction in enumerate(DIRECTIONS):
            frame = frames[direction].contiguous()
            sig = torch.sigmoid(gates[:, k])
            prev, mid, nxt = sig[:, 0] * has_prev, sig[:, 1], sig[:, 2] * has_next
            total = (prev + mid + nxt).clamp_min(1e-7)
            hidden = line_scan(
                frame,
                lam[:, k],
                prev / total,
                mid / total,
                nxt / total,
                direction="lr",
                chunk_size=self.chunk_size,
                normalize=False,
                backend=self.backend,
            )
            ys.append(torch.addcmul(u[:, k] * hidden, skip[:, k], frame))
        return self._merge(torch.stack(ys, dim=1))

    def extra_repr(self) -> str:
        scope = "global" if self.is_global else f"local, chunk_size={self.chunk_size}"
        fused = "" if self.fused else ", fused=False"
        compact = "" if self.propagation_channels is None else f", propagation_channels={self.propagation_channels}"
        return f"{self.channels}, d_state={self.d_state}{compact}, gate_channels={self.gate_channels}, {scope}{fused}"
