"""line_scan / line_scan_4d against the float64 oracle, for every backend, direction and chunking."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gspn
from gspn.ops import DIRECTIONS, line_scan, line_scan_4d
from oracle import expand_param, oracle_line_scan

BACKENDS = ["reference", "cpu"]
SHAPES = [(2, 3, 5, 7), (1, 2, 1, 6), (1, 2, 6, 1), (2, 2, 4, 9), (1, 1, 1, 1)]
CHUNKS = [None, 1, 2, 3]


def make_inputs(shape, *, param_batch=None, param_channels=None, dtype=torch.float64, seed=0, requires_grad=False):
    """x and (lam, w_left, w_mid, w_right); un-normalised weights in [0, 0.5) keep values moderate."""
    gen = torch.Generator().manual_seed(seed)
    batch, channels, height, width = shape
    pshape = (param_batch or batch, param_channels or channels, height, width)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    lam = torch.randn(pshape, generator=gen, dtype=dtype)
    gates = [torch.rand(pshape, generator=gen, dtype=dtype) * 0.5 for _ in range(3)]
    tensors = [x, lam, *gates]
    return [t.requires_grad_(requires_grad) for t in tensors]


def grads_of(out, inputs, upstream):
    return torch.autograd.grad(out, inputs, upstream, allow_unused=True, materialize_grads=True)


def assert_close(actual, expected, rtol=1e-10, atol=1e-12, name="output"):
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol + rtol * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
@pytest.mark.parametrize("chunk_size", CHUNKS, ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_gradients_match_oracle(shape, direction, chunk_size, normalize, backend):
    inputs = make_inputs(shape, requires_grad=True)
    out = line_scan(*inputs, direction=direction, chunk_size=chunk_size, normalize=normalize, backend=backend)
    expected = oracle_line_scan(*inputs, direction=direction, chunk_size=chunk_size, normalize=normalize)
    assert out.shape == shape and out.dtype == torch.float64
    assert_close(out, expected)

    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = grads_of(out, inputs, upstream)
    expected_grads = grads_of(expected, inputs, upstream)
    for name, g, e in zip(("x", "lam", "w_left", "w_mid", "w_right"), grads, expected_grads, strict=True):
        assert_close(g, e, name=f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_gradcheck(direction, normalize, backend):
    # channel-shared gates and a batch-shared lam exercise the broadcast adjoints too
    x, lam, wl, wm, wr = make_inputs((2, 4, 4, 5), param_channels=2, requires_grad=True)
    lam = lam[:1].detach().requires_grad_()

    def fn(*args):
        return line_scan(*args, direction=direction, chunk_size=3, normalize=normalize, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, lam, wl, wm, wr))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("param_batch,param_channels", [(1, 4), (2, 1), (2, 2), (1, 2)])
@pytest.mark.parametrize("direction", ["tb", "rl"])
def test_broadcast_gates_equal_expanded_gates(direction, param_batch, param_channels, backend):
    shape = (2, 4, 5, 6)
    inputs = make_inputs(shape, param_batch=param_batch, param_channels=param_channels, requires_grad=True)
    x, *params = inputs
    out = line_scan(x, *params, direction=direction, chunk_size=2, normalize=True, backend=backend)
    expected = oracle_line_scan(x, *params, direction=direction, chunk_size=2, normalize=True)
    assert_close(out, expected)
    upstream = torch.randn(shape, dtype=torch.float64)
    grads = grads_of(out, inputs, upstream)
    expected_grads = grads_of(expected, inputs, upstream)
    for g, e, p in zip(grads, expected_grads, inputs, strict=True):
        assert g.shape == p.shape
        assert_close(g, e)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_each_parameter_may_use_its_own_broadcast(direction, backend):
    shape = (2, 4, 5, 3)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    layouts = [(1, 4), (2, 1), (2, 4), (1, 2)]  # lam, w_left, w_mid, w_right
    params = [torch.randn(b, c, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True) for b, c in layouts]
    out = line_scan(x, *params, direction=direction, chunk_size=2, normalize=True, backend=backend)
    expected = oracle_line_scan(x, *params, direction=direction, chunk_size=2, normalize=True)
    assert_close(out, expected)
    upstream = torch.randn(shape, generator=gen, dtype=torch.float64)
    for g, e in zip(grads_of(out, (x, *params), upstream), grads_of(expected, (x, *params), upstream), strict=True):
        assert_close(g, e)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_line_scan_4d_equals_each_direction(chunk_size, normalize, backend):
    batch, channels, height, width = 2, 3, 5, 4
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, height, width, dtype=torch.float64, generator=gen, requires_grad=True)
    lam = torch.randn(batch, 4, channels, height, width, dtype=torch.float64, generator=gen, requires_grad=True)
    gates = [
        (torch.rand(batch, 4, 1, height, width, dtype=torch.float64, generator=gen) * 0.5).requires_grad_()
        for _ in range(3)
    ]
    out = line_scan_4d(x, lam, *gates, chunk_size=chunk_size, normalize=normalize, backend=backend)
    assert out.shape == (batch, 4, channels, height, width)
    per_direction = torch.stack(
        [
            line_scan(
                x,
                lam[:, k],
                *(g[:, k] for g in gates),
                direction=d,
                chunk_size=chunk_size,
                normalize=normalize,
                backend=backend,
            )
            for k, d in enumerate(DIRECTIONS)
        ],
        dim=1,
    )
    assert_close(out, per_direction)
    upstream = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    inputs = (x, lam, *gates)
    for g, e in zip(grads_of(out, inputs, upstream), grads_of(per_direction, inputs, upstream), strict=True):
        assert_close(g, e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_line_scan_4d_shared_direction_axis(backend):
    x, lam, wl, wm, wr = make_inputs((1, 2, 4, 4), requires_grad=True)
    params = [p.unsqueeze(1) for p in (lam, wl, wm, wr)]  # direction axis of size 1
    out = line_scan_4d(x, *params, normalize=True, backend=backend)
    for k, d in enumerate(DIRECTIONS):
        assert_close(out[:, k], line_scan(x, lam, wl, wm, wr, direction=d, normalize=True, backend="reference"))
    out.sum().backward()
    assert all(p.grad is not None for p in (x, lam, wl, wm, wr))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_dtypes_accumulate_in_float32(dtype, tol, backend):
    inputs = make_inputs((2, 3, 9, 11), dtype=dtype)
    for direction in DIRECTIONS:
        out = line_scan(*inputs, direction=direction, normalize=True, backend=backend)
        assert out.dtype == dtype
        expected = oracle_line_scan(*inputs, direction=direction, normalize=True)
        assert_close(out.double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_gradients(backend):
    inputs = make_inputs((1, 2, 6, 7), dtype=torch.bfloat16, requires_grad=True)
    out = line_scan(*inputs, direction="lr", normalize=True, backend=backend)
    out.float().square().sum().backward()
    for t in inputs:
        assert t.grad.dtype == torch.bfloat16 and torch.isfinite(t.grad).all()


def test_mixed_dtypes_promote():
    x, lam, wl, wm, wr = make_inputs((1, 2, 3, 4), dtype=torch.float32)
    out = line_scan(x.bfloat16(), lam.double(), wl, wm, wr)
    assert out.dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_channels_last_inputs(backend):
    x, lam, wl, wm, wr = make_inputs((2, 3, 6, 5), dtype=torch.float32)
    expected = line_scan(x, lam, wl, wm, wr, direction="lr", chunk_size=2, backend="reference")
    cl = [t.to(memory_format=torch.channels_last) for t in (x, lam, wl, wm, wr)]
    assert_close(line_scan(*cl, direction="lr", chunk_size=2, backend=backend), expected, rtol=1e-6)
    # transposed views: the same data seen through (H, W)-swapped strides
    tr = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (x, lam, wl, wm, wr)]
    assert not tr[0].is_contiguous()
    assert_close(line_scan(*tr, direction="lr", chunk_size=2, backend=backend), expected, rtol=1e-6)
    # slices along batch and channels keep their strides
    big = make_inputs((4, 6, 6, 5), dtype=torch.float32)
    sliced = [t[::2, 1::2] for t in big]
    dense = [t.contiguous() for t in sliced]
    assert_close(line_scan(*sliced, backend=backend), line_scan(*dense, backend="reference"), rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend):
    x, lam, wl, wm, wr = make_inputs((0, 2, 3, 4), requires_grad=True)
    out = line_scan(x, lam, wl, wm, wr, backend=backend)
    assert out.shape == (0, 2, 3, 4)
    out.sum().backward()
    assert x.grad.shape == x.shape


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 2),
    channels=st.sampled_from([1, 2, 4]),
    height=st.integers(1, 20),
    width=st.integers(1, 20),
    direction=st.sampled_from(DIRECTIONS),
    chunk_size=st.one_of(st.none(), st.integers(1, 8)),
    normalize=st.booleans(),
    param_channels=st.sampled_from(["full", "one", "half"]),
)
def test_cpu_backend_matches_reference_property(
    batch, channels, height, width, direction, chunk_size, normalize, param_channels
):
    pc = {"full": channels, "one": 1, "half": max(channels // 2, 1)}[param_channels]
    inputs = make_inputs((batch, channels, height, width), param_channels=pc, requires_grad=True)
    kwargs = dict(direction=direction, chunk_size=chunk_size, normalize=normalize)
    ref = line_scan(*inputs, **kwargs, backend="reference")
    cpu = line_scan(*inputs, **kwargs, backend="cpu")
    assert_close(cpu, ref)
    upstream = torch.randn_like(ref)
    for g, e in zip(grads_of(cpu, inputs, upstream), grads_of(ref, inputs, upstream), strict=True):
        assert_close(g, e)


@pytest.mark.parametrize("shape", [(1, 2, 37, 50), (2, 3, 40, 64)], ids=["ragged", "cache-line-aligned"])
def test_float32_long_lines_match_float64(shape):
    # Lines longer than the CPU kernel's strip and SIMD widths: a ragged last strip, and rows that
    # start on cache lines (the kernel streams whole lines to memory there).
    inputs = make_inputs(shape, dtype=torch.float32, requires_grad=True)
    for direction in DIRECTIONS:
        out = line_scan(*inputs, direction=direction, normalize=True, backend="cpu")
        ref = line_scan(*(t.double() for t in inputs), direction=direction, normalize=True, backend="reference")
        assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_expand_param_matches_documented_broadcast():
    p = torch.arange(2.0).view(1, 2, 1, 1).expand(1, 2, 2, 2)
    full = expand_param(p, (3, 4, 2, 2))
    assert full[:, :2].eq(0).all() and full[:, 2:].eq(1).all()  # contiguous channel groups
    assert gspn.ops.line_scan(torch.ones(3, 4, 2, 2), p, p, p, p).shape == (3, 4, 2, 2)
