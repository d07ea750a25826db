"""The fused GSPN layer operator: parameter generation, four scans, gating and merge in one op.

``gspn_mix`` computes exactly what :class:`gspn.nn.GSPN2d` computes from its proxy, without ever
materialising the ``(B, 4, C, H, W)`` parameter maps. ``torch.ops.gspn.gspn_mix`` and its
``gspn_mix_backward`` are ``torch.library`` operators with fake kernels (``torch.compile`` traces
them without a graph break), an explicit backward and a FLOP formula.

This folder is the operator: this module (the ops, their autograd and the public function) and its
backends side by side, each registered in :mod:`gspn.ops.backends` and called with one contract
(``forward(x, proxy, weights, chunk_size)``, ``backward(grad, x, proxy, weights, chunk_size)``,
``NATIVE_DTYPES``; :func:`_run` applies the dtype and layout rules for all):

* ``"reference"`` (:mod:`.reference`) — the composition of the existing ops (1×1 generation as
  ``einsum``, :func:`gspn.ops.line_scan_4d` with its reference backend, gating and merge): the readable
  specification, and an explicit chain-rule backward through ``gspn::line_scan_4d_backward``.
* ``"cpu"`` (:mod:`.cpu`) — the C++ kernel ``gspn/ops/csrc/gspn_mix.cpp``: channels-last, one batch
  element × 16 channels per work item, every pixel's gate logits, λ and u generated from the proxy
  in registers where the scan needs them; the backward recomputes each direction's hidden state (one direction and one
  channel block at a time) instead of storing four hidden maps.
* ``"triton"`` (:mod:`.triton`, kernels in :mod:`.kernels`) — the same fusion on a GPU in four
  launches (one per direction, each adding its term to ``y``): every line's gate logits, λ, ``m_k u_k`` and (first
  launch) the merged ``D`` are generated from the proxy in registers, the gates normalised, the
  state advanced and ``y`` read-modify-written; inputs are read in place in their own dtype. The
  backward is fused too (two launches per direction: recompute ``h_k``, then an adjoint kernel that
  regenerates the parameters and reduces the weight and proxy gradients in registers); lines
  longer than one register block (1024 positions on a GPU) fall back to recomputing one direction
  at a time through the line-scan kernels. Verified only under the Triton interpreter, never on a
  GPU.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from .. import _autograd
from .._library import channels_last, compute_dtype, custom_op, image_like
from ..backends import check_backend, register_backend, resolve_backend
from ..directions import DIRECTIONS
from ..line_scan import LineScan, LineScan4d, scan_flops, second_order
from ..validation import check_chunk_size, check_tensor
from . import cpu, reference, triton

register_backend("gspn_mix", "reference", reference)
register_backend("gspn_mix", "cpu", cpu, auto_on=("cpu",))
register_backend("gspn_mix", "triton", triton, auto_on=("cuda",))

__all__ = ["gspn_mix", "mix_flops"]

_NUM_DIRECTIONS = len(DIRECTIONS)


# --- argument checking ---------------------------------------------------------------------------


def _check_args(x, proxy, gate_weight, lam_weight, u_weight, skip_weight, merge_weight, chunk_size, backend):
    tensors = {
        "x": (x, 4, "(B, C, H, W)"),
        "proxy": (proxy, 4, "(B, S, H, W)"),
        "gate_weight": (gate_weight, 4, "(4, 3, Cg, S)"),
        "lam_weight": (lam_weight, 3, "(4, C, S)"),
        "u_weight": (u_weight, 3, "(4, C, S)"),
        "skip_weight": (skip_weight, 3, "(4, C, S)"),
        "merge_weight": (merge_weight, 1, "(4,)"),
    }
    for name, (t, ndim, layout) in tensors.items():
        check_tensor(name, t, ndim, layout)
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; all inputs must share one dtype")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all inputs must share a device")
    batch, channels, height, width = x.shape
    if channels == 0:
        raise ValueError("x must have at least one channel, got C = 0")
    if proxy.shape[0] != batch or tuple(proxy.shape[2:]) != (height, width):
        raise ValueError(
            f"proxy must have shape (B, S, H, W) = ({batch}, S, {height}, {width}), got {tuple(proxy.shape)}"
        )
    state = proxy.shape[1]
    if state == 0:
        raise ValueError("proxy must have at least one channel (S = d_state >= 1), got S = 0")
    if tuple(gate_weight.shape[:2]) != (_NUM_DIRECTIONS, 3):
        raise ValueError(f"gate_weight must have shape (4, 3, Cg, S), got {tuple(gate_weight.shape)}")
    gate_channels = gate_weight.shape[2]
    if gate_channels == 0 or channels % gate_channels:
        raise ValueError(
            f"gate_weight has Cg = {gate_channels} gate channels, which must divide C = {channels} "
            f"(gate_weight shape {tuple(gate_weight.shape)})"
        )
    if gate_weight.shape[3] != state:
        raise ValueError(
            f"gate_weight has S = {gate_weight.shape[3]} but proxy has S = {state} channels "
            f"(gate_weight shape {tuple(gate_weight.shape)}, proxy shape {tuple(proxy.shape)})"
        )
    for name, w in (("lam_weight", lam_weight), ("u_weight", u_weight), ("skip_weight", skip_weight)):
        if tuple(w.shape) != (_NUM_DIRECTIONS, channels, state):
            raise ValueError(f"{name} must have shape (4, C, S) = (4, {channels}, {state}), got {tuple(w.shape)}")
    if tuple(merge_weight.shape) != (_NUM_DIRECTIONS,):
        raise ValueError(f"merge_weight must have shape (4,), got {tuple(merge_weight.shape)}")
    chunk_size = check_chunk_size(chunk_size)
    check_backend(backend)
    return chunk_size


# --- operators -----------------------------------------------------------------------------------


def _run(x, proxy, weights, chunk_size, backend, grad=None):
    """Forward (``grad is None``) or backward of the backend registered as ``backend`` (or picked by
    ``"auto"``), in the one dtype and layout rule of every backend: a native backend's forward reads
    the inputs as they are, everything else runs in the compute dtype; results come back in
    ``x``'s dtype, ``y``/``dx``/``dproxy`` channels-last, the weight gradients contiguous."""
    dtype = x.dtype
    cdtype = compute_dtype(dtype)
    impl = resolve_backend(backend, x.device, op="gspn_mix")
    if grad is None:
        if not impl.NATIVE_DTYPES:
            x, proxy, *weights = (t.to(cdtype) for t in (x, proxy, *weights))
        return channels_last(impl.forward(x, proxy, weights, chunk_size)).to(dtype)
    grad, x, proxy, *weights = (t.to(cdtype) for t in (grad, x, proxy, *weights))
    outs = impl.backward(grad, x, proxy, weights, chunk_size)
    outs = [channels_last(o) for o in outs[:2]] + [o.contiguous() for o in outs[2:]]
    return [o.to(dtype) for o in outs]


@custom_op("gspn_mix")
def _gspn_mix_op(
    x: torch.Tensor,
    proxy: torch.Tensor,
    gate_weight: torch.Tensor,
    lam_weight: torch.Tensor,
    u_weight: torch.Tensor,
    skip_weight: torch.Tensor,
    merge_weight: torch.Tensor,
    chunk_size: int | None,
    backend: str,
) -> torch.Tensor:
    if x.numel() == 0:
        return image_like(x, x.shape[1])
    weights = (gate_weight, lam_weight, u_weight, skip_weight, merge_weight)
    return _run(x, proxy, weights, chunk_size, backend)


@_gspn_mix_op.register_fake
def _(x, proxy, gate_weight, lam_weight, u_weight, skip_weight, merge_weight, chunk_size, backend):
    return image_like(x, x.shape[1])


@custom_op("gspn_mix_backward")
def _gspn_mix_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    proxy: torch.Tensor,
    gate_weight: torch.Tensor,
    lam_weight: torch.Tensor,
    u_weight: torch.Tensor,
    skip_weight: torch.Tensor,
    merge_weight: torch.Tensor,
    chunk_size: int | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    weights = (gate_weight, lam_weight, u_weight, skip_weight, merge_weight)
    if x.numel() == 0:
        return (image_like(x, x.shape[1]), image_like(proxy, proxy.shape[1]), *(torch.zeros_like(w) for w in weights))
    return tuple(_run(x, proxy, weights, chunk_size, backend, grad=grad))


@_gspn_mix_backward_op.register_fake
def _(grad, x, proxy, gate_weight, lam_weight, u_weight, skip_weight, merge_weight, chunk_size, backend):
    weights = (gate_weight, lam_weight, u_weight, skip_weight, merge_weight)
    return (
        image_like(x, x.shape[1]),
        image_like(proxy, proxy.shape[1]),
        *(torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights),
    )


def _setup_context(ctx, inputs, output):
    *tensors, chunk_size, backend = inputs
    ctx.save_for_backward(*tensors)
    ctx.options = (chunk_size, backend)


def _gspn_mix_autograd(ctx, grad):
    grads = torch.ops.gspn.gspn_mix_backward(grad, *ctx.saved_tensors, *ctx.options)
    return (*grads, None, None)


_gspn_mix_op.register_autograd(_gspn_mix_autograd, setup_context=_setup_context, public="gspn.ops.gspn_mix")
_gspn_mix_op.register_vmap(shared=[False, False] + [True] * 5 + [False, False])


def _no_double_backward(ctx, *grads):
    raise _double_backward_error()


def _double_backward_error() -> RuntimeError:
    return RuntimeError(
        "double backward (create_graph=True, e.g. a gradient penalty) through gspn.ops.gspn_mix is not "
        "supported: its fused backward is not itself differentiable. GSPN2d(fused=False) computes the same "
        "layer from gspn.ops.line_scan_4d, which supports double backward"
    )


_gspn_mix_backward_op.register_autograd(
    _no_double_backward, setup_context=lambda ctx, inputs, output: None, public="gspn.ops.gspn_mix"
)
_gspn_mix_backward_op.register_vmap()


# --- every autograd mode: the Functions the public API calls ---------------------------------------


def _generation_tangent(weight, t_weight, proxy, t_proxy, pattern: str):
    """Tangent of ``einsum(pattern, weight, proxy)`` (bilinear); ``None`` if both tangents are."""
    out = None
    if t_weight is not None:
        out = torch.einsum(pattern, t_weight, proxy)
    if t_proxy is not None:
        term = torch.einsum(pattern, weight, t_proxy)
        out = term if out is None else out + term
    return out


def mix_jvp(primals, tangents, chunk_size, backend: str) -> torch.Tensor:
    """Jacobian-vector product of ``gspn::gspn_mix``, by the product rule through its definition.

    With the generated maps ``G = W ⊗ z`` (bilinear: ``Ġ = Ẇ ⊗ z + W ⊗ ż``), the scans' tangent
    ``ḣ_k`` (:func:`gspn.ops.line_scan.second_order.scan_4d_jvp`, one more scan per direction) and
    ``y = Σ_k m_k (u_k ⊙ h_k + D_k ⊙ x)``::

        ẏ = Σ_k ṁ_k (u_k h_k + D_k x) + m_k (u̇_k h_k + u_k ḣ_k + Ḋ_k x + D_k ẋ)

    It materialises the per-pixel maps (as ``GSPN2d(fused=False)`` does). ``tangents``: one per
    tensor input of :func:`gspn_mix`, ``None`` for zero. Returns ``ẏ`` in ``x``'s dtype.
    """
    x, proxy, gate_w, lam_w, u_w, skip_w, merge_w = primals
    dtype = compute_dtype(x.dtype)
    x, proxy, gate_w, lam_w, u_w, skip_w, merge_w = (t.to(dtype) for t in primals)
    t_x, t_proxy, t_gate, t_lam, t_u, t_skip, t_merge = (None if t is None else t.to(dtype) for t in tangents)
    gates, lam, u, skip = reference.generate(proxy, gate_w, lam_w, u_w, skip_w)
    t_gates = _generation_tangent(gate_w, t_gate, proxy, t_proxy, "kgcs,bshw->bkgchw")
    t_lam, t_u, t_skip = (
        _generation_tangent(w, t, proxy, t_proxy, "kcs,bshw->bkchw")
        for w, t in ((lam_w, t_lam), (u_w, t_u), (skip_w, t_skip))
    )
    params = (lam, gates[:, :, 0], gates[:, :, 1], gates[:, :, 2])
    h = LineScan4d.apply(x, *params, chunk_size, True, backend)
    t_params = (t_lam, *((None,) * 3 if t_gates is None else (t_gates[:, :, 0], t_gates[:, :, 1], t_gates[:, :, 2])))
    t_h = second_order.scan_4d_jvp(h, x, params, (t_x, *t_params), chunk_size, True, backend, scan=LineScan.apply)
    xk = x.unsqueeze(1)
    t_y = u * t_h
    if t_u is not None:
        t_y = t_y + t_u * h
    if t_skip is not None:
        t_y = t_y + t_skip * xk
    if t_x is not None:
        t_y = t_y + skip * t_x.unsqueeze(1)
    out = torch.einsum("k,bkchw->bchw", merge_w, t_y)
    if t_merge is not None:
        out = out + torch.einsum("k,bkchw->bchw", t_merge, u * h + skip * xk)
    # In the layout of the operator's result (channels-last), as forward AD requires of a tangent.
    return out.to(primals[0].dtype).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def _no_double_backward_vjp(saved, cotangents, options):
    raise _double_backward_error()


_GspnMixBackward = _autograd.backward_function(
    "_GspnMixBackward",
    "gspn::gspn_mix_backward",
    torch.ops.gspn.gspn_mix_backward,
    8,
    vjp=_no_double_backward_vjp,
    hint="forward-over-reverse (jacfwd(jacrev(f)), torch.func.hessian) is not supported; "
    "GSPN2d(fused=False) and gspn.ops.line_scan_4d support reverse-over-reverse",
)
# gspn::gspn_mix: saved = the seven tensor inputs (the backward recomputes the scans).
_GspnMix = _autograd.forward_function(
    "_GspnMix",
    torch.ops.gspn.gspn_mix,
    7,
    backward=lambda saved, grad, options: _GspnMixBackward.apply(grad, *saved, *options),
    jvp=lambda saved, tangents, options: mix_jvp(saved, tangents, *options),
    shared=[False, False] + [True] * 5 + [False, False],  # the weights have no batch dimension
    save_output=False,
)


# --- FLOP formulas -------------------------------------------------------------------------------


def mix_flops(batch: int, channels: int, height: int, width: int, state: int, gate_channels: int) -> int:
    """Multiply-accumulates of one :func:`gspn_mix` forward, in the papers' convention.

    The 1×1 generation of the gate logits, λ, u and D (``B·H·W·S·(12·Cg + 12·C)`` MACs, what the four
    up-projection convolutions of the unfused layer count), the merger (``4·B·C·H·W``, its 4 → 1
    projection) and the four scans (:func:`gspn.ops.scan_flops`) — the same total as the unfused
    :class:`gspn.nn.GSPN2d` after ``x_conv_down``. Gating products and normalisation are not counted,
    as in the papers.
    """
    pixels = batch * height * width
    generation = pixels * state * (12 * gate_channels + 12 * channels)
    merge = 4 * pixels * channels
    scans = 2 * (scan_flops(batch, channels, height, width) + scan_flops(batch, channels, width, height))
    return generation + merge + scans


@register_flop_formula(torch.ops.gspn.gspn_mix)
def _(x_shape, proxy_shape, gate_shape, *args, out_shape=None, **kwargs) -> int:
    batch, channels, height, width = x_shape
    return mix_flops(batch, channels, height, width, proxy_shape[1], gate_shape[2])


@register_flop_formula(torch.ops.gspn.gspn_mix_backward)
def _(grad_shape, x_shape, proxy_shape, gate_shape, *args, **kwargs) -> int:
    # Recomputed forward, adjoint scans, and two 1×1 products (weight gradient, proxy gradient)
    # per generated value.
    batch, channels, height, width = x_shape
    forward = mix_flops(batch, channels, height, width, proxy_shape[1], gate_shape[2])
    return 3 * forward


# --- public API ----------------------------------------------------------------------------------


def gspn_mix(
    x: torch.Tensor,
    proxy: torch.Tensor,
    gate_weight: torch.Tensor,
    lam_weight: torch.Tensor,
    u_weight: torch.Tensor,
    skip_weight: torch.Tensor,
    merge_weight: torch.Tensor,
    *,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    r"""The GSPN layer in one operator: generate, scan four directions, gate and merge.

    For direction ``k`` (order of :data:`gspn.ops.DIRECTIONS`) and pixel ``p``, with ``z = proxy[:, :, p]``::

        a_k = gate_weight[k] @ z        (3 raw gate logits per gate channel)
        λ_k = lam_weight[k] @ z,   u_k = u_weight[k] @ z,   D_k = skip_weight[k] @ z
        h_k = line_scan(x, λ_k, *a_k, direction=k, chunk_size=chunk_size, normalize=True)
        y   = Σ_k merge_weight[k] · (u_k ⊙ h_k + D_k ⊙ x)

    which is :class:`gspn.nn.GSPN2d`'s computation after its down-projection ``proxy = x_conv_down(x)``.
    Gate channel ``g`` serves the contiguous channel group ``[g·C/Cg, (g+1)·C/Cg)``.

    Args:
        x: ``(B, C, H, W)``, float32/float64 (float16/bfloat16 are computed in float32).
        proxy: ``(B, S, H, W)``, ``S = d_state``.
        gate_weight: ``(4, 3, Cg, S)``, ``Cg`` dividing ``C``; gate ``0/1/2`` = left/mid/right neighbour.
        lam_weight, u_weight, skip_weight: ``(4, C, S)``.
        merge_weight: ``(4,)``.
        chunk_size: ``None`` (global scans) or the local tile size, as in :func:`gspn.ops.line_scan`.
        backend: ``"auto"``, ``"reference"``, ``"cpu"`` or ``"triton"`` (see the module doc).

    Returns:
        ``y: (B, C, H, W)`` in ``x``'s dtype, in channels-last memory format on every backend.

    Raises:
        TypeError: a non-tensor, non-floating or mixed-dtype input; a non-int ``chunk_size``.
        ValueError: a shape that does not fit (naming the argument), ``S`` differing between
            ``proxy`` and the weights, ``Cg`` not dividing ``C``, ``C = 0`` or ``S = 0``, mixed
            devices, ``chunk_size <= 0``, an unknown ``backend``.
        RuntimeError: a known backend that cannot run here (e.g. ``"triton"`` on CPU tensors).

    Autograd: an explicit backward gives ``dx``, ``dproxy`` and the five weight gradients in memory
    O(size of ``x`` + ``proxy``): the CPU kernel recomputes each direction's hidden state (one
    direction and one 16-channel block at a time) rather than saving the four hidden maps, which
    would be 4× the size of ``x``; the Triton backend recomputes one direction's hidden map at a
    time (two maps of ``x``'s size plus proxy-sized partials). Double backward
    raises a ``RuntimeError`` (the unfused composition, ``GSPN2d(fused=False)``, supports it).
    """
    chunk_size = _check_args(
        x, proxy, gate_weight, lam_weight, u_weight, skip_weight, merge_weight, chunk_size, backend
    )
    return _autograd.apply(
        _GspnMix,
        torch.ops.gspn.gspn_mix,
        *(x, proxy, gate_weight, lam_weight, u_weight, skip_weight, merge_weight, chunk_size, backend),
    )
