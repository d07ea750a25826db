"""What every ``gspn::`` operator shares: its ``torch.library`` definition and the dtype and layout rules.

* :func:`custom_op` defines ``gspn::<name>`` from a Python function (an :class:`Op`: fake, autograd
  and batching registrations), run outside the caller's autocast (:func:`outside_autocast`).
* dtypes: an operator computes in :func:`compute_dtype` of :func:`result_dtype` of its inputs;
  a backend that reads half inputs in their own dtype says so (``NATIVE_DTYPES``) and is handed
  them as they are (:func:`operand`), every other one gets them up-cast.
* layouts: kernels want every ``(H, W)`` plane dense row-major (:func:`dense_planes`); the scan
  operators return row-major results (:func:`dense_like`, :func:`dense_zeros`), the fused layer
  channels-last ones (:func:`channels_last`, :func:`image_like`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import _autograd

__all__ = [
    "Op",
    "channels_last",
    "compute_dtype",
    "custom_op",
    "dense_like",
    "dense_planes",
    "dense_zeros",
    "image_like",
    "operand",
    "outside_autocast",
    "result_dtype",
]

_LIB = torch.library.Library("gspn", "DEF")


class Op:
    """A ``gspn::<name>`` operator defined from a Python function's signature.

    ``torch.library.custom_op`` would do the same, but wraps the implementation in
    ``torch._disable_dynamo``, whose first call imports ``torch._dynamo`` (0.7–2.7 s here): every
    process paid that on its first scan. Defining the op with ``torch.library`` directly keeps the
    schema inference, fake and autograd registrations, and is just as opaque to ``torch.compile``.
    """

    def __init__(self, name: str, impl: Callable[..., Any]) -> None:
        self.name = name
        self.qualname = f"gspn::{name}"
        _LIB.define(name + torch.library.infer_schema(impl, mutates_args=()))
        _LIB.impl(name, outside_autocast(impl), "CompositeExplicitAutograd")

    def register_fake(self, fn):
        torch.library.register_fake(self.qualname, fn, lib=_LIB)
        return fn

    def register_autograd(self, backward, *, setup_context, public: str) -> None:
        """The operator's reverse-mode formula, and a clear error for forward-mode tangents.

        ``torch.library.register_autograd``'s kernel would pass a dual tensor through and drop its
        tangent (a silent zero); this kernel refuses it, naming ``public``, the function that
        supports forward mode (:mod:`gspn.ops._autograd`).
        """
        op = getattr(torch.ops.gspn, self.name).default
        info = torch._library.autograd.Info(backward, setup_context)
        kernel = torch._library.autograd.make_autograd_impl(op, info)
        qualname = self.qualname

        def autograd_kernel(keyset, *args, **kwargs):
            _autograd.check_no_tangents(qualname, args, public)
            return kernel(keyset, *args, **kwargs)

        _LIB.impl(self.name, autograd_kernel, "Autograd", with_keyset=True)

    def register_vmap(self, *, shared: Sequence[bool] | None = None) -> None:
        """A batching rule for the raw operator (``vmap`` over a backward, e.g.
        ``torch.autograd.grad(..., is_grads_batched=True)``, ``jacobian(vectorize=True)``).

        ``shared``: per argument, whether it has no batch dimension; the rule then folds the vmapped
        dimension into the batch (:func:`_autograd.vmap_by_batch`). ``None``: one call per vmapped
        entry (:func:`_autograd.vmap_by_loop`), for the backward operators, which reduce over the batch.
        """
        op = getattr(torch.ops.gspn, self.name).default

        def rule(info, in_dims, *args):
            if shared is None:
                return _autograd.vmap_by_loop(info, in_dims, args, op)
            return _autograd.vmap_by_batch(info, in_dims, args, op, shared=shared)

        torch.library.register_vmap(self.qualname, rule, lib=_LIB)


def outside_autocast(impl):
    """``impl`` run with autocast disabled on its tensors' devices.

    An operator without an autocast kernel is called with the caller's autocast state still on, so
    the torch operations *inside* its implementation (the weight packing and ``einsum`` generation
    of ``gspn_mix``) would run in float16/bfloat16 while the kernels read the compute dtype: wrong
    numbers, or reads past the end of a half-size buffer. The operators compute in the dtype of
    their inputs (:func:`compute_dtype`), under autocast or not.
    """

    @functools.wraps(impl)
    def run(*args):
        devices = {a.device.type for a in args if isinstance(a, torch.Tensor)}
        active = [d for d in devices if torch.is_autocast_enabled(d)]
        if not active:
            return impl(*args)
        with contextlib.ExitStack() as stack:
            for device in active:
                stack.enter_context(torch.autocast(device, enabled=False))
            return impl(*args)

    return run


def custom_op(name: str) -> Callable[[Callable[..., Any]], Op]:
    """Decorator: define ``gspn::<name>`` with the decorated function as its implementation."""
    return lambda impl: Op(name, impl)


# --- dtypes --------------------------------------------------------------------------------------


def result_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """dtype of the result: the promotion of all input dtypes (e.g. bf16 x with fp32 gates → fp32)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for half types, otherwise the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def operand(t: torch.Tensor, cdtype: torch.dtype, native: bool) -> torch.Tensor:
    """``t`` as a backend reads it: in its own dtype if the backend is ``native`` (reads half types
    directly), else in the accumulation dtype ``cdtype``; every ``(H, W)`` plane dense row-major."""
    return dense_planes(t, t.dtype if native else cdtype)


# --- layouts -------------------------------------------------------------------------------------


def dense_planes(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast to ``dtype`` and make the (H, W) plane dense row-major; batch/channel strides stay as they are."""
    t = t.to(dtype)
    h, w = t.shape[-2:]
    if (w > 1 and t.stride(-1) != 1) or (h > 1 and t.stride(-2) != w):
        t = t.contiguous()
    return t


def dense_zeros(t: torch.Tensor) -> torch.Tensor:
    """Zeros of ``t``'s shape, dtype and device, row-major (not ``zeros_like``: that keeps t's layout)."""
    return torch.zeros(t.shape, dtype=t.dtype, device=t.device)


def dense_like(t: torch.Tensor) -> torch.Tensor:
    """Fake result of ``t``'s shape, dtype and device, row-major like the real results."""
    return t.new_empty(t.shape)


def image_like(x: torch.Tensor, channels: int) -> torch.Tensor:
    """An uninitialised ``(B, channels, H, W)`` tensor like ``x``, in channels-last memory format."""
    b, _, h, w = x.shape
    return x.new_empty((b, h, w, channels)).permute(0, 3, 1, 2)


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if it is laid out as :func:`image_like` lays results out, else a copy that is."""
    if t.stride() == image_like(t[:0], t.shape[1]).stride():
        return t
    return image_like(t, t.shape[1]).copy_(t)
