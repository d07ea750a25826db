"""Public line-scan operators, registered as ``torch.library`` operators with an explicit adjoint.

``torch.ops.gspn.line_scan`` / ``line_scan_4d`` and their ``*_backward`` ops are opaque to
``torch.compile`` (no graph break), carry fake (meta) implementations, and have FLOP formulas
registered with :mod:`torch.utils.flop_counter`. Backward memory is O(input): the forward saves its
inputs and output, and the backward is one reverse scan. The backward operators are differentiable
as well (double backward, :mod:`.second_order`). Every operator returns row-major tensors.

This folder is the operator: this module (the ops, their autograd and the public functions), its
backends side by side — :mod:`.reference` (the readable specification), :mod:`.cpu` (the C++ kernel
``gspn/ops/csrc/line_scan.cpp``), :mod:`.triton` (kernels in :mod:`.kernels`, one file per variant) —
registered in :mod:`gspn.ops.backends`, and :mod:`.second_order` (the derivative of the backward).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch.utils.flop_counter import register_flop_formula

from .. import _autograd
from .._library import compute_dtype, custom_op, dense_like, dense_zeros, operand, result_dtype
from ..backends import register_backend, resolve_backend
from ..directions import DIRECTIONS, get_direction
from ..validation import check_line_scan_args, reduce_to_shape
from . import cpu, reference, second_order, triton

__all__ = ["ScanBackend", "line_scan", "line_scan_4d", "scan_flops"]


@runtime_checkable
class ScanBackend(Protocol):
    """What :func:`line_scan` and :func:`line_scan_4d` call on a backend (registered as
    ``register_backend("line_scan", name, module)``; :mod:`.reference`, :mod:`.cpu`, :mod:`.triton`).

    A backend receives tensors already validated, with H and W contiguous; parameters keep their
    compact broadcast shapes; unless it sets ``NATIVE_DTYPES`` they are in the accumulation dtype
    (float32/float64). ``isinstance(module, ScanBackend)`` checks that every member exists (not
    their signatures; ``tests/ops/test_ops_api.py`` checks those for the shipped backends).
    """

    __name__: str
    """Module name, e.g. ``"gspn.ops.line_scan.cpu"``."""

    NATIVE_DTYPES: bool
    """True if the kernels read float16/bfloat16 inputs directly (the caller must not up-cast them);
    False if they expect everything in the float32/float64 accumulation dtype."""

    def is_available(self, device: torch.device) -> bool:
        """True if the backend can run on tensors of ``device``."""
        ...

    def unavailable_reason(self, device: torch.device) -> str:
        """``""`` if the backend can run on ``device``, else a one-line reason for the error message."""
        ...

    def allocate(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised buffer for outputs and gradients
        (:func:`gspn.ops.backends.plain_allocate` unless the backend wants something special, e.g.
        huge pages)."""
        ...

    def scan(
        self,
        x: torch.Tensor,
        lam: torch.Tensor,
        w_left: torch.Tensor,
        w_mid: torch.Tensor,
        w_right: torch.Tensor,
        *,
        direction: str,
        chunk_size: int | None,
        normalize: bool,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """Forward scan of one direction: writes ``h`` (``(B, C, H, W)``, image frame) into ``out``
        (possibly a strided view, e.g. ``out[:, k]`` of a ``(B, 4, C, H, W)`` buffer) and returns it.
        ``x`` is ``(B, C, H, W)``; the parameters ``(B or 1, C or a divisor of C, H, W)``."""
        ...

    def scan_backward(
        self,
        grad: torch.Tensor,
        h: torch.Tensor,
        x: torch.Tensor,
        lam: torch.Tensor,
        w_left: torch.Tensor,
        w_mid: torch.Tensor,
        w_right: torch.Tensor,
        *,
        direction: str,
        chunk_size: int | None,
        normalize: bool,
        dx: torch.Tensor,
        accumulate_dx: bool,
        d_params: Sequence[torch.Tensor],
    ) -> None:
        """Adjoint scan of one direction: writes (or, with ``accumulate_dx``, adds) ``dL/dx`` into
        ``dx`` and the full-size ``(B, C, H, W)`` gradients of ``lam, w_left, w_mid, w_right``
        (w.r.t. the logits if ``normalize``) into the four ``d_params`` buffers (possibly strided
        views); reducing them to the broadcast shapes is the caller's job."""
        ...


register_backend("line_scan", "reference", reference)
register_backend("line_scan", "cpu", cpu, auto_on=("cpu",))
register_backend("line_scan", "triton", triton, auto_on=("cuda",))


def _direction_slice(p: torch.Tensor, k: int) -> torch.Tensor:
    """Parameter of direction ``k`` from a ``(B, 4 or 1, C, H, W)`` tensor."""
    return p[:, k if p.shape[1] == 4 else 0]


def _forward(x, params, directions, chunk_size, normalize, backend, four_directions):
    dtype = result_dtype(x, *params)
    cdtype = compute_dtype(dtype)
    shape = (x.shape[0], 4, *x.shape[1:]) if four_directions else x.shape
    if any(n == 0 for n in shape):
        return torch.empty(shape, dtype=dtype, device=x.device)
    module: ScanBackend = resolve_backend(backend, x.device)
    native = module.NATIVE_DTYPES
    out = module.allocate(shape, dtype if native else cdtype, x.device)
    xs = operand(x, cdtype, native)
    ps = [operand(p, cdtype, native) for p in params]
    for k, direction in enumerate(directions):
        step_params = [_direction_slice(p, k) for p in ps] if four_directions else ps
        step_out = out[:, k] if four_directions else out
        module.scan(xs, *step_params, direction=direction, chunk_size=chunk_size, normalize=normalize, out=step_out)
    return out.to(dtype)


def _backward(grad, h, x, params, directions, chunk_size, normalize, backend, four_directions):
    cdtype = compute_dtype(result_dtype(x, *params))
    if grad.numel() == 0:
        return [dense_zeros(t) for t in (x, *params)]
    module: ScanBackend = resolve_backend(backend, x.device)
    native = module.NATIVE_DTYPES
    xs = operand(x, cdtype, native)
    ps = [operand(p, cdtype, native) for p in params]
    grad = operand(grad, cdtype, native)
    h = operand(h, cdtype, native)
    # dx accumulates over the four directions in cdtype; a native backend writes one direction's
    # dx in x's dtype directly.
    dx = module.allocate(x.shape, x.dtype if native and not four_directions else cdtype, x.device)
    # Full-size gradient buffers of the parameters, (B, 4, C, H, W) for the 4-direction op: the
    # backend writes each direction's slice in place; broadcast parameters are reduced afterwards
    # (in the accumulation dtype).
    full_shape = (x.shape[0], 4, *x.shape[1:]) if four_directions else x.shape
    d_params = [module.allocate(full_shape, cdtype, x.device) for _ in params]
    for k, direction in enumerate(directions):
        step_params = [_direction_slice(p, k) for p in ps] if four_directions else ps
        g, hk = (grad[:, k], h[:, k]) if four_directions else (grad, h)
        step_grads = [d[:, k] for d in d_params] if four_directions else d_params
        module.scan_backward(
            g,
            hk,
            xs,
            *step_params,
            direction=direction,
            chunk_size=chunk_size,
            normalize=normalize,
            dx=dx,
            accumulate_dx=k > 0,
            d_params=step_grads,
        )
    channel_dim = 2 if four_directions else 1
    return [dx.to(x.dtype).contiguous()] + [
        reduce_to_shape(d, p.shape, channel_dim=channel_dim).to(p.dtype).contiguous()
        for d, p in zip(d_params, params, strict=True)
    ]


# Layout of the results: every gspn:: scan operator returns dense row-major
# (``torch.contiguous_format``) tensors, whatever the layouts of its inputs (channels-last,
# transposed, expanded, sliced), and its fake implementation says exactly that
# (:func:`gspn.ops._library.dense_like`). Gradients therefore come back row-major too.


# --- one direction -------------------------------------------------------------------------------


@custom_op("line_scan")
def _line_scan_op(
    x: torch.Tensor,
    lam: torch.Tensor,
    w_left: torch.Tensor,
    w_mid: torch.Tensor,
    w_right: torch.Tensor,
    direction: str,
    chunk_size: int | None,
    normalize: bool,
    backend: str,
) -> torch.Tensor:
    return _forward(x, (lam, w_left, w_mid, w_right), (direction,), chunk_size, normalize, backend, False)


@_line_scan_op.register_fake
def _(x, lam, w_left, w_mid, w_right, direction, chunk_size, normalize, backend):
    return x.new_empty(x.shape, dtype=result_dtype(x, lam, w_left, w_mid, w_right))


@custom_op("line_scan_backward")
def _line_scan_backward_op(
    grad: torch.Tensor,
    h: torch.Tensor,
    x: torch.Tensor,
    lam: torch.Tensor,
    w_left: torch.Tensor,
    w_mid: torch.Tensor,
    w_right: torch.Tensor,
    direction: str,
    chunk_size: int | None,
    normalize: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    params = (lam, w_left, w_mid, w_right)
    return tuple(_backward(grad, h, x, params, (direction,), chunk_size, normalize, backend, False))


@_line_scan_backward_op.register_fake
def _(grad, h, x, lam, w_left, w_mid, w_right, direction, chunk_size, normalize, backend):
    return tuple(dense_like(t) for t in (x, lam, w_left, w_mid, w_right))


def _setup_context(ctx, inputs, output):
    x, lam, w_left, w_mid, w_right, *options = inputs
    ctx.save_for_backward(x, lam, w_left, w_mid, w_right, output)
    ctx.options = options


def _line_scan_autograd(ctx, grad):
    x, lam, w_left, w_mid, w_right, out = ctx.saved_tensors
    grads = torch.ops.gspn.line_scan_backward(grad, out, x, lam, w_left, w_mid, w_right, *ctx.options)
    return (*grads, *([None] * len(ctx.options)))


_line_scan_op.register_autograd(_line_scan_autograd, setup_context=_setup_context, public="gspn.ops.line_scan")
_line_scan_op.register_vmap(shared=[False] * 9)


def _setup_backward_context(ctx, inputs, output):
    grad, h, x, lam, w_left, w_mid, w_right, *options = inputs
    ctx.save_for_backward(grad, h, x, lam, w_left, w_mid, w_right)
    ctx.options = options


def _line_scan_backward_autograd(ctx, *cotangents):
    # cotangents: one per gradient the backward returned
    grad, h, x, *params = ctx.saved_tensors
    grads = second_order.backward_vjp(grad, h, x, params, cotangents, *ctx.options, **_RAW_OPS)
    return (*grads, *([None] * len(ctx.options)))


# The backward is differentiable too (double backward, e.g. gradient penalties): its derivative is
# one forward and one backward scan through these same operators (gspn/ops/line_scan/second_order.py).
_line_scan_backward_op.register_autograd(
    _line_scan_backward_autograd, setup_context=_setup_backward_context, public="gspn.ops.line_scan"
)
_line_scan_backward_op.register_vmap()


# --- four directions -----------------------------------------------------------------------------


@custom_op("line_scan_4d")
def _line_scan_4d_op(
    x: torch.Tensor,
    lam: torch.Tensor,
    w_left: torch.Tensor,
    w_mid: torch.Tensor,
    w_right: torch.Tensor,
    chunk_size: int | None,
    normalize: bool,
    backend: str,
) -> torch.Tensor:
    return _forward(x, (lam, w_left, w_mid, w_right), DIRECTIONS, chunk_size, normalize, backend, True)


@_line_scan_4d_op.register_fake
def _(x, lam, w_left, w_mid, w_right, chunk_size, normalize, backend):
    return x.new_empty((x.shape[0], 4, *x.shape[1:]), dtype=result_dtype(x, lam, w_left, w_mid, w_right))


@custom_op("line_scan_4d_backward")
def _line_scan_4d_backward_op(
    grad: torch.Tensor,
    h: torch.Tensor,
    x: torch.Tensor,
    lam: torch.Tensor,
    w_left: torch.Tensor,
    w_mid: torch.Tensor,
    w_right: torch.Tensor,
    chunk_size: int | None,
    normalize: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    params = (lam, w_left, w_mid, w_right)
    return tuple(_backward(grad, h, x, params, DIRECTIONS, chunk_size, normalize, backend, True))


@_line_scan_4d_backward_op.register_fake
def _(grad, h, x, lam, w_left, w_mid, w_right, chunk_size, normalize, backend):
    return tuple(dense_like(t) for t in (x, lam, w_left, w_mid, w_right))


def _line_scan_4d_autograd(ctx, grad):
    x, lam, w_left, w_mid, w_right, out = ctx.saved_tensors
    grads = torch.ops.gspn.line_scan_4d_backward(grad, out, x, lam, w_left, w_mid, w_right, *ctx.options)
    return (*grads, *([None] * len(ctx.options)))


_line_scan_4d_op.register_autograd(_line_scan_4d_autograd, setup_context=_setup_context, public="gspn.ops.line_scan_4d")
_line_scan_4d_op.register_vmap(shared=[False] * 8)


def _line_scan_4d_backward_autograd(ctx, *cotangents):
    grad, h, x, *params = ctx.saved_tensors
    grads = second_order.backward_4d_vjp(grad, h, x, params, cotangents, *ctx.options, **_RAW_OPS)
    return (*grads, *([None] * len(ctx.options)))


_line_scan_4d_backward_op.register_autograd(
    _line_scan_4d_backward_autograd, setup_context=_setup_backward_context, public="gspn.ops.line_scan_4d"
)
_line_scan_4d_backward_op.register_vmap()


# The derivative of the backward calls the raw operators (torch.compile's path and direct callers).
_RAW_OPS = {"scan": torch.ops.gspn.line_scan, "scan_backward": torch.ops.gspn.line_scan_backward}


# --- every autograd mode: the Functions the public API calls ---------------------------------------


def _line_scan_backward(*args):
    return list(_LineScanBackward.apply(*args))


# The derivative of the backward under torch.func calls the operators through their Functions.
_FUNCTION_OPS = {"scan": lambda *args: LineScan.apply(*args), "scan_backward": _line_scan_backward}


def _scan_vjp(saved, cotangents, options):
    grad, h, x, *params = saved
    return second_order.backward_vjp(grad, h, x, params, cotangents, *options, **_FUNCTION_OPS)


def _scan_4d_vjp(saved, cotangents, options):
    grad, h, x, *params = saved
    return second_order.backward_4d_vjp(grad, h, x, params, cotangents, *options, **_FUNCTION_OPS)


_LineScanBackward = _autograd.backward_function(
    "_LineScanBackward",
    "gspn::line_scan_backward",
    torch.ops.gspn.line_scan_backward,
    7,
    vjp=_scan_vjp,
    hint=_autograd.FORWARD_OVER_REVERSE,
)
_LineScan4dBackward = _autograd.backward_function(
    "_LineScan4dBackward",
    "gspn::line_scan_4d_backward",
    torch.ops.gspn.line_scan_4d_backward,
    7,
    vjp=_scan_4d_vjp,
    hint=_autograd.FORWARD_OVER_REVERSE,
)
# gspn::line_scan and gspn::line_scan_4d: saved = (x, λ, w_left, w_mid, w_right, output); the
# tangent is one more forward scan (second_order.scan_jvp).
LineScan = _autograd.forward_function(
    "_LineScan",
    torch.ops.gspn.line_scan,
    5,
    backward=lambda saved, grad, options: _LineScanBackward.apply(grad, saved[-1], *saved[:-1], *options),
    jvp=lambda saved, tangents, options: second_order.scan_jvp(
        saved[-1], saved[0], saved[1:-1], tangents, *options, scan=LineScan.apply
    ),
    shared=[False] * 9,
    save_output=True,
)
LineScan4d = _autograd.forward_function(
    "_LineScan4d",
    torch.ops.gspn.line_scan_4d,
    5,
    backward=lambda saved, grad, options: _LineScan4dBackward.apply(grad, saved[-1], *saved[:-1], *options),
    jvp=lambda saved, tangents, options: second_order.scan_4d_jvp(
        saved[-1], saved[0], saved[1:-1], tangents, *options, scan=LineScan.apply
    ),
    shared=[False] * 8,
    save_output=True,
)


# --- FLOP formulas -------------------------------------------------------------------------------


def scan_flops(batch: int, channels: int, num_lines: int, line_length: int) -> int:
    """Multiplies and adds of one direction's recurrence: ``B · C · (L − 1) · (7P − 4)``.

    This is the GSPN papers' counting convention (each line after the first costs 4 multiplies and
    3 adds per pixel, minus the missing neighbours at both ends; the first line's ``λ·x`` and the
    optional gate normalisation are not counted). Model-level MAC tables in the papers add this
    number to the multiply-accumulates of convolutions and linears.
    """
    return batch * channels * max(num_lines - 1, 0) * max(7 * line_length - 4, 0)


def _scan_flops_of_shape(x_shape, direction: str) -> int:
    batch, channels, height, width = x_shape
    vertical = get_direction(direction).vertical
    return scan_flops(batch, channels, height if vertical else width, width if vertical else height)


@register_flop_formula(torch.ops.gspn.line_scan)
def _(x_shape, lam_shape, wl_shape, wm_shape, wr_shape, direction, *args, out_shape=None, **kwargs) -> int:
    return _scan_flops_of_shape(x_shape, direction)


@register_flop_formula(torch.ops.gspn.line_scan_4d)
def _(x_shape, *args, out_shape=None, **kwargs) -> int:
    return sum(_scan_flops_of_shape(x_shape, d) for d in DIRECTIONS)


@register_flop_formula(torch.ops.gspn.line_scan_backward)
def _(grad_shape, h_shape, x_shape, lam_shape, wl_shape, wm_shape, wr_shape, direction, *args, **kwargs) -> int:
    # Adjoint recurrence (same cost as the forward) plus one multiply per pixel for each of the
    # five input gradients.
    return _scan_flops_of_shape(x_shape, direction) + 5 * x_shape.numel()


@register_flop_formula(torch.ops.gspn.line_scan_4d_backward)
def _(grad_shape, h_shape, x_shape, *args, **kwargs) -> int:
    return sum(_scan_flops_of_shape(x_shape, d) for d in DIRECTIONS) + 4 * 5 * x_shape.numel()


# --- public API ----------------------------------------------------------------------------------


def line_scan(
    x: torch.Tensor,
    lam: torch.Tensor,
    w_left: torch.Tensor,
    w_mid: torch.Tensor,
    w_right: torch.Tensor,
    *,
    direction: str = "tb",
    chunk_size: int | None = None,
    normalize: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """GSPN 2-D linear propagation along one direction.

    For ``direction="tb"`` (rows, top → bottom), with zero state before the first row and zero
    outside the image::

        h[r, c] = lam[r, c] x[r, c] + w_left[r, c] h[r-1, c-1] + w_mid[r, c] h[r-1, c] + w_right[r, c] h[r-1, c+1]

    ``"bt"`` reads row ``r+1`` instead; ``"lr"`` / ``"rl"`` scan columns and read column ``c∓1``
    at rows ``r-1, r, r+1`` (left/right = index −1/+1 along the axis perpendicular to the scan).

    **Unused gates.** A gate whose neighbour does not exist — all three gates on a line that starts a
    tile (no previous line), ``w_left`` at the first and ``w_right`` at the last position of a line —
    is never used: whatever it holds (NaN, ±Inf included) it influences neither the output nor any
    gradient, on every backend, direction, chunking and ``normalize`` mode, and its own gradient is
    exactly 0.

    Args:
        x: input ``(B, C, H, W)``.
        lam, w_left, w_mid, w_right: per-pixel parameters in the image frame, ``(B, C, H, W)`` or
            broadcast: batch ``B`` or 1; channels ``C`` or a divisor ``Cg`` of ``C`` (parameter
            channel ``k`` serves the contiguous channel group ``[k·C/Cg, (k+1)·C/Cg)``, i.e.
            ``repeat_interleave`` semantics); H and W exact.
        direction: ``"tb"``, ``"bt"``, ``"lr"`` or ``"rl"``.
        chunk_size: ``None`` for global GSPN; ``k`` cuts the scan axis into image-aligned tiles
            ``[j·k, (j+1)·k)`` and restarts the scan from zero state where it enters each tile
            (any ``k`` at least as long as the scan axis, even past int64, is global GSPN).
        normalize: if ``True``, the ``w_*`` are raw logits and the stability–context condition
            (:func:`gspn.ops.stabilize`) is applied inside the operator.
        backend: ``"auto"`` (fastest available for the device), ``"reference"``, ``"cpu"`` or
            ``"triton"``.

    Returns:
        ``h`` with the shape of ``x`` and the promoted dtype of the inputs, row-major whatever the
        input layouts (gradients too). float16/bfloat16 inputs are accumulated in float32. Empty
        inputs (any of B, C, H, W = 0) give an empty result and zero gradients. Differentiable to
        any order on every backend (double backward, e.g. a gradient penalty, is exact).

    Raises:
        TypeError: a non-tensor or non-floating-point input, a ``direction`` that is not a str
            (``None`` included), a non-int ``chunk_size`` or a non-bool ``normalize``.
        ValueError: wrong dims or shapes that do not broadcast as above, inputs on different
            devices, ``chunk_size <= 0``, an unknown ``direction`` or ``backend``, or (with
            ``backend="auto"``) an unknown ``GSPN_BACKEND`` in the environment. Every message
            names the argument and the allowed values.
        RuntimeError: the requested backend is not available for the tensors' device.

    Example:
        >>> import torch, gspn
        >>> x = torch.randn(2, 8, 16, 16)
        >>> lam, wl, wm, wr = torch.randn(4, 2, 8, 16, 16)
        >>> h = gspn.ops.line_scan(x, lam, wl, wm, wr, direction="lr", normalize=True)
        >>> h.shape
        torch.Size([2, 8, 16, 16])
    """
    chunk_size = check_line_scan_args(
        x,
        (lam, w_left, w_mid, w_right),
        direction=direction,
        chunk_size=chunk_size,
        normalize=normalize,
        backend=backend,
        four_directions=False,
    )
    return _autograd.apply(
        LineScan, torch.ops.gspn.line_scan, x, lam, w_left, w_mid, w_right, direction, chunk_size, normalize, backend
    )


def line_scan_4d(
    x: torch.Tensor,
    lam: torch.Tensor,
    w_left: torch.Tensor,
    w_mid: torch.Tensor,
    w_right: torch.Tensor,
    *,
    chunk_size: int | None = None,
    normalize: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """All four scan directions over one input, each returned in the image frame.

    Args:
        x: input ``(B, C, H, W)``.
        lam, w_left, w_mid, w_right: ``(B, 4, C, H, W)`` in the direction order
            ``("tb", "bt", "lr", "rl")``; broadcast as in :func:`line_scan`, and the direction
            axis may also be 1 (shared by all directions).
        chunk_size, normalize, backend: as in :func:`line_scan` (unused gates, layouts and
            autograd, double backward included, also as there).

    Returns:
        ``(B, 4, C, H, W)``, row-major; ``out[:, k]`` equals ``line_scan(x, ..., direction=DIRECTIONS[k])``.
        No flipped or transposed copy of ``x`` is made: the fast backends index the image in place.

    Raises:
        TypeError, ValueError, RuntimeError: as :func:`line_scan`.
    """
    chunk_size = check_line_scan_args(
        x,
        (lam, w_left, w_mid, w_right),
        direction=None,
        chunk_size=chunk_size,
        normalize=normalize,
        backend=backend,
        four_directions=True,
    )
    return _autograd.apply(
        LineScan4d, torch.ops.gspn.line_scan_4d, x, lam, w_left, w_mid, w_right, chunk_size, normalize, backend
    )
