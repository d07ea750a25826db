"""What makes every ``gspn::`` operator work under every autograd mode, not just reverse mode.

``torch.library.register_autograd`` gives an operator a backward, but its generated
``autograd.Function`` has no ``setup_context`` (so ``torch.func.grad``/``vjp``/``jacrev`` refuse it) and
forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``) passes through it *dropping the
tangent*: the result would silently be a constant. The public functions therefore call each
operator through an ``autograd.Function`` of this module's shape — ``setup_context``, ``backward``,
``jvp`` and ``vmap`` (the structure of PyTorch's "Extending torch.func with autograd.Function") —
whenever a transform or a dual level is active; otherwise, and while ``torch.compile`` traces
(dynamo cannot trace a custom ``jvp``), they call the opaque operator itself, whose registered
backward serves reverse mode. The operators' own autograd kernels refuse forward-mode tangents with
an error naming the operator, so no path returns a zero tangent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD

__all__ = [
    "apply",
    "backward_function",
    "check_no_tangents",
    "forward_ad_unsupported",
    "forward_function",
    "vmap_by_batch",
    "vmap_by_loop",
]

FORWARD_OVER_REVERSE = (
    "forward-over-reverse (jacfwd(jacrev(f)), torch.func.hessian) is not supported; "
    "use reverse-over-reverse (jacrev(jacrev(f)))"
)


def _forward_mode_possible() -> bool:
    """Whether a forward-mode tangent or a ``torch.func`` transform can reach an operator call."""
    return torch._C._are_functorch_transforms_active() or getattr(fwAD, "_current_level", 0) >= 0


def apply(function: type[torch.autograd.Function], op: Callable[..., Any], *args: Any) -> Any:
    """``function.apply(*args)`` under ``torch.func`` transforms or a ``forward_ad.dual_level``;
    otherwise the operator ``op`` itself, whose registered backward serves reverse mode (and
    ``torch.compile``, which cannot trace a custom ``jvp``) without the ``Function``'s call overhead."""
    if not torch.compiler.is_compiling() and _forward_mode_possible():
        return function.apply(*args)
    return op(*args)


def below_autograd(op: Callable[..., Any], *args: Any) -> Any:
    """Call ``op`` under the autograd dispatch keys (what an ``autograd.Function.forward`` does)."""
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def forward_ad_unsupported(qualname: str, hint: str) -> NotImplementedError:
    """The error raised where forward-mode AD cannot be supported (never a silent zero tangent)."""
    modes = "torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad"
    return NotImplementedError(f"forward-mode AD ({modes}) through {qualname}: {hint}")


def check_no_tangents(qualname: str, args: Sequence[Any], public: str) -> None:
    """Raise if a tensor argument of a raw operator call carries a forward-mode tangent.

    Raises:
        NotImplementedError: naming the operator and the public function that supports forward mode.
    """
    if not _forward_mode_possible():  # no dual level, no transform: no tangent can be attached
        return
    for a in args:
        if isinstance(a, torch.Tensor) and fwAD.unpack_dual(a).tangent is not None:
            raise forward_ad_unsupported(
                qualname, f"the raw operator drops tangents; call {public}, which supports forward-mode AD"
            )


def _batched(t: torch.Tensor, dim: int | None, size: int) -> torch.Tensor:
    """``t`` with its vmapped dimension first; unbatched tensors are expanded (a view)."""
    return t.movedim(dim, 0) if dim is not None else t.unsqueeze(0).expand(size, *t.shape)


def vmap_by_batch(
    info: Any, in_dims: Sequence[int | None], args: Sequence[Any], call: Callable[..., Any], shared: Sequence[bool]
) -> tuple[Any, Any]:
    """A vmap rule that folds the vmapped dimension into the operators' batch dimension (dim 0).

    For operators without reductions over the batch (the forward scans): every tensor argument is
    ``(B or 1, ...)``. A tensor that vmap does not batch and whose batch is 1 stays as it is (it
    broadcasts); every other one is laid out ``(V, B, ...)`` and folded to ``(V·B, ...)``. Tensors
    marked in ``shared`` (no batch dimension at all, e.g. ``gspn_mix``'s weights) must be unbatched,
    otherwise the rule loops (:func:`vmap_by_loop`).

    Returns:
        ``(output, out_dims)`` as an ``autograd.Function.vmap`` staticmethod returns them.
    """
    size = info.batch_size
    if any(s and d is not None for s, d in zip(shared, in_dims, strict=True)):
        return vmap_by_loop(info, in_dims, args, call)
    batch = max(
        _batched(a, d, size).shape[1]
        for a, d, s in zip(args, in_dims, shared, strict=True)
        if isinstance(a, torch.Tensor) and not s
    )
    folded = []
    for a, d, s in zip(args, in_dims, shared, strict=True):
        if not isinstance(a, torch.Tensor) or s or (d is None and a.shape[0] == 1):
            folded.append(a)
            continue
        t = _batched(a, d, size)
        t = t.expand(size, batch, *t.shape[2:])
        folded.append(t.reshape(size * batch, *t.shape[2:]))
    out = call(*folded)
    if isinstance(out, torch.Tensor):
        return out.view(size, batch, *out.shape[1:]), 0
    return tuple(o.view(size, batch, *o.shape[1:]) for o in out), tuple(0 for _ in out)


def vmap_by_loop(
    info: Any, in_dims: Sequence[int | None], args: Sequence[Any], call: Callable[..., Any]
) -> tuple[Any, Any]:
    """A vmap rule that calls the operator once per vmapped index and stacks the results.

    Exact for every operator, including the backward operators, whose parameter gradients are
    reduced over the batch (folding would mix different vmapped entries).
    """
    results = []
    for i in range(info.batch_size):
        results.append(
            call(
                *(
                    a.select(d, i) if isinstance(a, torch.Tensor) and d is not None else a
                    for a, d in zip(args, in_dims, strict=True)
                )
            )
        )
    if isinstance(results[0], torch.Tensor):
        return torch.stack(results), 0
    return tuple(torch.stack(r) for r in zip(*results, strict=True)), tuple(0 for _ in results[0])


def forward_function(
    name: str,
    op: Callable[..., Any],
    num_tensors: int,
    *,
    backward: Callable[..., Any],
    jvp: Callable[..., Any],
    shared: Sequence[bool],
    save_output: bool,
) -> type[torch.autograd.Function]:
    """The ``autograd.Function`` through which a public function calls the forward operator ``op``.

    Args:
        name: the class name.
        op: the operator; its first ``num_tensors`` arguments are tensors, the rest options.
        backward: ``backward(saved, grad, options) -> gradients of the tensor inputs``, where
            ``saved`` is the tensor inputs (and the output, last, if ``save_output``).
        jvp: ``jvp(saved, tangents, options) -> tangent of the output`` (tangents: one per tensor
            input, ``None`` for zero).
        shared: per argument, whether it has no batch dimension (see :func:`vmap_by_batch`).
        save_output: whether ``backward``/``jvp`` need the output.
    """

    def forward(*args: Any) -> Any:
        return below_autograd(op, *args)

    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        saved = (*inputs[:num_tensors], output) if save_output else inputs[:num_tensors]
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)
        ctx.options = inputs[num_tensors:]

    def backward_(ctx: Any, grad: torch.Tensor) -> tuple:
        return (*backward(ctx.saved_tensors, grad, ctx.options), *([None] * len(ctx.options)))

    def jvp_(ctx: Any, *tangents: Any) -> torch.Tensor:
        return jvp(ctx.saved_tensors, tangents[:num_tensors], ctx.options)

    def vmap(info: Any, in_dims: tuple, *args: Any) -> tuple[Any, Any]:
        return vmap_by_batch(info, in_dims, args, function.apply, shared=shared)

    methods = {"forward": forward, "setup_context": setup_context, "backward": backward_, "jvp": jvp_, "vmap": vmap}
    function = type(name, (torch.autograd.Function,), {k: staticmethod(v) for k, v in methods.items()})
    return function


def backward_function(
    name: str, qualname: str, op: Callable[..., Any], num_tensors: int, *, vjp: Callable[..., Any], hint: str
) -> type[torch.autograd.Function]:
    """The ``autograd.Function`` of a backward operator ``op`` (returning a tuple of gradients).

    Reverse mode through ``vjp(saved tensor inputs, cotangents, options)`` (double backward);
    forward mode raises :func:`forward_ad_unsupported` naming ``qualname`` with ``hint``; vmap loops
    (:func:`vmap_by_loop`: the parameter gradients are reduced over the batch).
    """

    def forward(*args: Any) -> tuple:
        return tuple(below_autograd(op, *args))

    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.save_for_backward(*inputs[:num_tensors])
        ctx.options = inputs[num_tensors:]

    def backward(ctx: Any, *cotangents: Any) -> tuple:
        return (*vjp(ctx.saved_tensors, cotangents, ctx.options), *([None] * len(ctx.options)))

    def jvp(ctx: Any, *tangents: Any) -> Any:
        raise forward_ad_unsupported(qualname, hint)

    def vmap(info: Any, in_dims: tuple, *args: Any) -> tuple[Any, Any]:
        return vmap_by_loop(info, in_dims, args, function.apply)

    methods = {"forward": forward, "setup_context": setup_context, "backward": backward, "jvp": jvp, "vmap": vmap}
    function = type(name, (torch.autograd.Function,), {k: staticmethod(v) for k, v in methods.items()})
    return function
