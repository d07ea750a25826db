"""Double (and higher) backward through the scan, e.g. a gradient penalty with ``create_graph=True``.

The backward operators have their own exact derivative (gspn/ops/line_scan/second_order.py): compared here
with autograd through the float64 oracle, with finite differences, and by ``gradgradcheck``, on the
reference and CPU backends (triton: tests/ops/test_triton.py).
"""

from __future__ import annotations

import pytest
import torch

from gspn.ops import DIRECTIONS, line_scan, line_scan_4d
from inert_gates import POISONS
from oracle import oracle_line_scan, unused_gates

BACKENDS = ["reference", "cpu"]


def _inputs(shape=(2, 2, 4, 3), seed=0):
    """x, a batch-shared λ and channel-shared gates (the broadcast adjoints are differentiated too)."""
    gen = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    lam = torch.randn(1, c, h, w, generator=gen, dtype=torch.float64)
    gates = [0.5 * torch.randn(b, 1, h, w, generator=gen, dtype=torch.float64) for _ in range(3)]
    return [x, lam, *gates]


def second_order(fn, inputs, seed=1, order=2):
    """Gradients of a penalty built from the first-order gradients (``create_graph=True``): a random
    projection of every gradient plus ``|dL/dx|²``, with a loss that is non-linear in the output."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    gen = torch.Generator().manual_seed(seed)
    out = fn(*inputs)
    loss = (out.sin() * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
    grads = torch.autograd.grad(loss, inputs, create_graph=True)
    penalty = sum((g * torch.randn(g.shape, generator=gen, dtype=g.dtype)).sum() for g in grads)
    penalty = penalty + grads[0].square().sum()
    second = torch.autograd.grad(penalty, inputs, create_graph=order > 2)
    if order == 2:
        return second
    third = sum((g * torch.randn(g.shape, generator=gen, dtype=g.dtype)).sum() for g in second)
    return torch.autograd.grad(third, inputs)


def _assert_close(got, want):
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=lambda m, k=k: f"input {k}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_second_order_matches_oracle(direction, normalize, backend):
    for chunk_size in (None, 2):
        kwargs = {"direction": direction, "chunk_size": chunk_size, "normalize": normalize}
        got = second_order(lambda *a, kw=kwargs: line_scan(*a, **kw, backend=backend), _inputs())
        want = second_order(lambda *a, kw=kwargs: oracle_line_scan(*a, **kw), _inputs())
        assert any(g.abs().max() > 1e-3 for g in got)
        _assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_gradgradcheck(direction, normalize, backend):
    def fn(*args):
        return line_scan(*args, direction=direction, chunk_size=2, normalize=normalize, backend=backend)

    inputs = [t.requires_grad_() for t in _inputs((2, 2, 3, 4))]
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_penalty_matches_finite_differences(backend):
    """The reported kind of case: d/dw_mid of the penalty |dL/dx|² on a 4×4 image came back as
    silent zeros on the CPU backend (and as an unrelated error on the reference backend)."""
    x, lam, wl, wm, wr = _inputs((1, 1, 4, 4), seed=3)

    def penalty(w_mid, create_graph):
        xr = x.detach().requires_grad_()
        out = line_scan(xr, lam, wl, w_mid, wr, direction="tb", normalize=True, backend=backend)
        (gx,) = torch.autograd.grad(out.square().sum(), xr, create_graph=create_graph)
        return gx.square().sum()

    wm = wm * 8
    w = wm.clone().requires_grad_()
    (analytic,) = torch.autograd.grad(penalty(w, True), w)
    numeric = torch.zeros_like(wm)
    eps = 1e-6
    for i in range(wm.numel()):
        step = torch.zeros(wm.numel(), dtype=wm.dtype)
        step[i] = eps
        step = step.view_as(wm)
        numeric.view(-1)[i] = (penalty(wm + step, False) - penalty(wm - step, False)) / (2 * eps)
    assert numeric.abs().max() > 1
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_third_order_matches_oracle(backend):
    kwargs = {"direction": "lr", "chunk_size": 2, "normalize": True}
    inputs = _inputs((1, 2, 3, 4))
    got = second_order(lambda *a: line_scan(*a, **kwargs, backend=backend), inputs, order=3)
    want = second_order(lambda *a: oracle_line_scan(*a, **kwargs), inputs, order=3)
    _assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
def test_line_scan_4d_second_order(normalize, backend):
    """Per-direction λ, direction-shared gates: the oracle per direction, stacked."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2, 3, 4, generator=gen, dtype=torch.float64)
    lam = torch.randn(1, 4, 2, 3, 4, generator=gen, dtype=torch.float64)
    gates = [0.5 * torch.randn(1, 1, 1, 3, 4, generator=gen, dtype=torch.float64) for _ in range(3)]

    def oracle_4d(x, lam, *gates):
        return torch.stack(
            [
                oracle_line_scan(
                    x, lam[:, k], *(g[:, 0] for g in gates), direction=d, chunk_size=2, normalize=normalize
                )
                for k, d in enumerate(DIRECTIONS)
            ],
            dim=1,
        )

    got = second_order(
        lambda *a: line_scan_4d(*a, chunk_size=2, normalize=normalize, backend=backend), [x, lam, *gates]
    )
    _assert_close(got, second_order(oracle_4d, [x, lam, *gates]))
    params = [t.requires_grad_() for t in (x, lam, *gates)]
    assert torch.autograd.gradgradcheck(
        lambda *a: line_scan_4d(*a, chunk_size=2, normalize=normalize, backend=backend), params, fast_mode=True
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
def test_unused_gates_stay_inert_in_second_order(normalize, backend):
    """NaN/±Inf in unused gates change no second-order gradient either, and theirs are exactly 0."""
    for direction in DIRECTIONS:
        kwargs = {"direction": direction, "chunk_size": 2, "normalize": normalize, "backend": backend}
        inputs = _inputs()
        mask = unused_gates(4, 3, direction, 2)
        poisoned = list(inputs)
        for k in range(3):
            poisoned[2 + k] = inputs[2 + k].masked_fill(mask[k], POISONS[k])
        want = second_order(lambda *a, kw=kwargs: line_scan(*a, **kw), inputs)
        got = second_order(lambda *a, kw=kwargs: line_scan(*a, **kw), poisoned)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
        for k in range(3):
            assert got[2 + k].masked_select(mask[k].expand_as(got[2 + k])).eq(0).all()
