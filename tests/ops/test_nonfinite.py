"""Gates that the recurrence does not use never influence anything, whatever they hold.

The rule (docs/operator.md, "Unused gates"): a gate whose neighbour does not exist — ``w_left`` at
the first position of a line, ``w_right`` at the last, all three gates on a line that starts a tile
— is never read into the output or any gradient, on every backend, in every direction, chunking
and normalize mode, even if it is NaN or ±Inf; its own gradient is exactly 0.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from gspn.ops import DIRECTIONS, line_scan, line_scan_4d, stabilize
from inert_gates import GATES, POISONS, check_unused_gates_are_inert, inputs
from oracle import unused_gates

BACKENDS = ["reference", "cpu"]  # triton: tests/ops/test_triton.py


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_unused_gates_never_influence_line_scan(direction, normalize, backend):
    for shape, chunk_size in [((2, 3, 5, 6), None), ((2, 3, 5, 6), 2), ((1, 2, 4, 1), 3), ((1, 2, 1, 4), 1)]:
        mask = unused_gates(shape[2], shape[3], direction, chunk_size)
        kwargs = {"direction": direction, "chunk_size": chunk_size, "normalize": normalize}
        check_unused_gates_are_inert(line_scan, inputs(shape), mask, backend, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
def test_unused_gates_never_influence_line_scan_4d(normalize, backend):
    """Per-direction gates: each direction's unused entries poisoned in its own slice."""
    shape = (2, 2, 5, 4)
    x, lam, *gates = inputs((shape[0], 4, *shape[1:]))
    x = x[:, 0]
    mask = torch.stack([unused_gates(5, 4, d, 2) for d in DIRECTIONS], dim=1)  # (3, 4, H, W)
    mask = mask[:, None, :, None]  # (3, 1, 4, 1, H, W): broadcast over batch and channels
    check_unused_gates_are_inert(line_scan_4d, [x, lam, *gates], mask, backend, chunk_size=2, normalize=normalize)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
def test_unused_gates_float32_and_broadcast(normalize, backend):
    """float32 (the vectorised CPU paths, strips of 16 columns) and channel/batch-shared gates."""
    shape = (2, 4, 7, 19)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=gen)
    lam = torch.randn(1, 4, 7, 19, generator=gen)
    gates = [torch.randn(1, 2, 7, 19, generator=gen) for _ in range(3)]
    for direction in DIRECTIONS:
        mask = unused_gates(7, 19, direction, 3)
        kwargs = {"direction": direction, "chunk_size": 3, "normalize": normalize}
        check_unused_gates_are_inert(line_scan, [x, lam, *gates], mask, backend, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unused_gate_gradient_is_zero_even_with_non_finite_upstream(backend):
    shape = (1, 2, 4, 5)
    for direction, normalize in itertools.product(DIRECTIONS, (False, True)):
        tensors = [t.requires_grad_() for t in inputs(shape)]
        out = line_scan(*tensors, direction=direction, chunk_size=2, normalize=normalize, backend=backend)
        upstream = torch.full(shape, float("nan"), dtype=torch.float64)
        grads = torch.autograd.grad(out, tensors, upstream)
        mask = unused_gates(4, 5, direction, 2)
        for k in GATES:
            assert grads[2 + k].masked_select(mask[k].expand(shape)).eq(0).all()


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_stabilize_ignores_missing_neighbours(direction):
    gen = torch.Generator().manual_seed(2)
    logits = [torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64) for _ in range(3)]
    pos = torch.arange(5 if direction in ("tb", "bt") else 4)
    line_dim = -1 if direction in ("tb", "bt") else -2
    shape = [1, 1]
    shape[line_dim] = pos.numel()
    missing = torch.stack([pos == 0, torch.zeros_like(pos, dtype=torch.bool), pos == pos.numel() - 1])
    mask = missing.view(3, *shape).expand(3, 4, 5)
    clean = [t.detach().requires_grad_() for t in logits]
    want = stabilize(*clean, direction=direction)
    want_grads = torch.autograd.grad(sum(w.sin().sum() for w in want), clean)
    for gate, value in itertools.product((0, 2), POISONS):
        poisoned = [t.clone().requires_grad_() for t in logits]
        poisoned[gate] = poisoned[gate].detach().masked_fill(mask[gate], value).requires_grad_()
        got = stabilize(*poisoned, direction=direction)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
        grads = torch.autograd.grad(sum(w.sin().sum() for w in got), poisoned)
        for g, w in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
        assert grads[gate].masked_select(mask[gate].expand_as(grads[gate])).eq(0).all()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e4, -1e4])
def test_used_non_finite_logits_follow_the_reference_in_float32(value):
    """A used gate logit that is NaN, ±Inf or huge: the float32 CPU kernels (lines of 16 or more
    positions, where the normalisation runs in vector registers two vectors at a time) give what the
    float64 reference gives: a NaN spreads along the scan, ±Inf and huge logits give 0/1 weights."""
    gen = torch.Generator().manual_seed(7)
    shape = (1, 2, 20, 37)
    x, lam = (torch.randn(shape, generator=gen) for _ in range(2))
    gates = [torch.randn(shape, generator=gen) for _ in range(3)]
    for k, (c, i, j) in enumerate([(0, 5, 17), (1, 9, 33), (0, 14, 2)]):
        gates[k][0, c, i, j] = value
    for direction in DIRECTIONS:
        got = line_scan(x, lam, *gates, direction=direction, normalize=True, backend="cpu")
        want = line_scan(
            *(t.double() for t in (x, lam, *gates)), direction=direction, normalize=True, backend="reference"
        )
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, equal_nan=True, msg=direction)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e4])
def test_non_finite_proxy_follows_the_reference_in_gspn_mix(value):
    from gspn.ops import gspn_mix

    gen = torch.Generator().manual_seed(8)
    c, s = 32, 3
    x, proxy = torch.randn(1, c, 13, 21, generator=gen), torch.randn(1, s, 13, 21, generator=gen)
    proxy[0, 1, 6, 10] = value
    weights = [torch.randn(4, 3, c, s, generator=gen), *(torch.randn(4, c, s, generator=gen) for _ in range(3))]
    merge = torch.randn(4, generator=gen)
    got = gspn_mix(x, proxy, *weights, merge, backend="cpu")
    want = gspn_mix(*(t.double() for t in (x, proxy, *weights, merge)), backend="reference")
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_lines_of_one_pixel_give_exactly_zero_gate_gradients(backend, dtype):
    """A position with no neighbour has the single weight 1 whatever its logit, so every gate gradient
    of a line of one pixel is exactly 0 (not rounding noise that large gate weights would amplify)."""
    gen = torch.Generator().manual_seed(9)
    for shape, directions in [((2, 3, 7, 1), ("tb", "bt")), ((2, 3, 1, 7), ("lr", "rl"))]:
        for direction in directions:
            tensors = [(5 * torch.randn(shape, generator=gen, dtype=dtype)).requires_grad_() for _ in range(5)]
            out = line_scan(*tensors, direction=direction, normalize=True, backend=backend)
            grads = torch.autograd.grad(out, tensors, torch.randn(shape, generator=gen, dtype=dtype))
            for k in GATES:
                assert grads[2 + k].eq(0).all(), (direction, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_lines_of_one_pixel_give_exactly_zero_gate_gradients_in_gspn_mix(backend, dtype):
    from gspn.ops import gspn_mix

    gen = torch.Generator().manual_seed(10)
    c, s = 17, 3
    # W = 1: the row scans (tb, bt: directions 0, 1) have lines of one pixel; H = 1: the column scans.
    for (h, w), flat in [((9, 1), slice(0, 2)), ((1, 9), slice(2, 4))]:
        x, proxy = (
            torch.randn(2, c, h, w, generator=gen, dtype=dtype),
            torch.randn(2, s, h, w, generator=gen, dtype=dtype),
        )
        weights = [
            400 * torch.randn(4, 3, c, s, generator=gen, dtype=dtype),
            *(torch.randn(4, c, s, generator=gen, dtype=dtype) for _ in range(3)),
            torch.randn(4, generator=gen, dtype=dtype),
        ]
        leaves = [t.requires_grad_() for t in (x, proxy, *weights)]
        y = gspn_mix(*leaves, backend=backend)
        gate_grad = torch.autograd.grad(y, leaves[2], torch.randn(y.shape, generator=gen, dtype=dtype))[0]
        assert gate_grad[flat].eq(0).all()
