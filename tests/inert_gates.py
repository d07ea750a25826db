"""Shared check of the unused-gate rule (tests/ops/test_nonfinite.py, and tests/ops/test_triton.py for triton)."""

from __future__ import annotations

import contextlib

import torch

POISONS = [float("nan"), float("inf"), float("-inf")]
GATES = (0, 1, 2)  # w_left, w_mid, w_right


def inputs(shape, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, lam, *gates = (torch.randn(shape, generator=gen, dtype=dtype) for _ in range(5))
    return [x, lam, *(0.5 * g for g in gates)]


def _poisoned(inputs, mask, shift):
    """A copy of ``inputs`` whose unused gate entries hold NaN, +Inf or -Inf, cycling over the
    positions (and over ``shift``), so that one call poisons every gate with every value."""
    out = [t.clone() for t in inputs]
    for gate in GATES:
        m = mask[gate].to(out[0].device)
        cycle = (torch.arange(m.numel(), device=m.device).view(m.shape) + gate + shift) % len(POISONS)
        values = torch.tensor(POISONS, dtype=out[2 + gate].dtype, device=m.device)[cycle]
        out[2 + gate] = torch.where(m, values, out[2 + gate])
    return out


def _results(fn, inputs, upstream, context, **kwargs):
    inputs = [t.detach().requires_grad_() for t in inputs]
    with context():
        out = fn(*inputs, **kwargs)
        return [out.detach(), *torch.autograd.grad(out, inputs, upstream)]


def check_unused_gates_are_inert(fn, inputs, mask, backend, context=contextlib.nullcontext, shifts=3, **kwargs):
    """Unused gate entries holding NaN/±Inf give the same output and gradients as finite values there
    (bit for bit), and exactly zero gradient at those entries.

    ``mask``: ``(3, ...)`` unused entries of (w_left, w_mid, w_right), broadcast to the gates;
    ``shifts``: poisoned calls (with 3 every entry meets every value); ``context()`` is entered
    around each forward and backward.
    """
    gen = torch.Generator().manual_seed(1)
    with context():
        shape = fn(*inputs, backend=backend, **kwargs).shape
    upstream = torch.randn(shape, generator=gen, dtype=inputs[0].dtype).to(inputs[0].device)
    clean = _results(fn, inputs, upstream, context, backend=backend, **kwargs)
    names = ("h", "dx", "dlam", "dw_left", "dw_mid", "dw_right")
    for shift in range(shifts):
        got = _results(fn, _poisoned(inputs, mask, shift), upstream, context, backend=backend, **kwargs)
        for name, g, c in zip(names, got, clean, strict=True):
            where = f"{name} with NaN/Inf in unused gates (shift {shift}), {kwargs}"
            assert torch.isfinite(g).all(), f"{where}: not finite"
            torch.testing.assert_close(g, c, rtol=0, atol=0, msg=lambda m, w=where: f"{w}: {m}")
        for gate in GATES:
            own = got[3 + gate]
            assert own.masked_select(mask[gate].to(own.device).expand_as(own)).eq(0).all()
