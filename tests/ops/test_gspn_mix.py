"""The fused GSPN layer operator ``gspn.ops.gspn_mix``: every backend against an independent float64
oracle and against each other, gradients, GSPN2d's fused and unfused paths, layouts, compile, FLOPs
and bad input."""

from __future__ import annotations

import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import gspn
from gspn.nn import GSPN2d
from gspn.ops import available_backends, gspn_mix, mix_flops, scan_flops
from gspn.ops.gspn_mix import cpu as mix_cpu
from oracle import oracle_mix

BACKENDS = [b for b in ("reference", "cpu") if b in available_backends("cpu")]
NAMES = ("x", "proxy", "gate_weight", "lam_weight", "u_weight", "skip_weight", "merge_weight")


def make(batch, channels, height, width, state, gate_channels, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=gen, dtype=dtype)

    return [
        rand(batch, channels, height, width),
        rand(batch, state, height, width),
        rand(4, 3, gate_channels, state, scale=2.0),
        rand(4, channels, state, scale=0.5),
        rand(4, channels, state),
        rand(4, channels, state),
        rand(4),
    ]


CASES = [  # (B, C, H, W, S, Cg, chunk_size)
    (2, 5, 4, 6, 3, 5, None),
    (1, 16, 5, 3, 2, 4, None),
    (2, 6, 5, 5, 2, 1, 2),
    (1, 3, 1, 5, 2, 3, None),  # H = 1
    (1, 3, 5, 1, 2, 3, 3),  # W = 1
    (1, 18, 3, 4, 1, 6, 1),  # two channel blocks, chunk 1 (no propagation at all)
    (2, 4, 7, 3, 3, 2, 4),  # chunk that does not divide H
]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_every_backend_matches_the_oracle_with_gradients(case):
    *shape, chunk_size = case
    args = make(*shape)
    leaves = [a.clone().requires_grad_() for a in args]
    expected = oracle_mix(*leaves, chunk_size=chunk_size)
    grad_out = torch.randn_like(expected)
    expected_grads = [
        torch.zeros_like(leaf) if g is None else g  # chunk_size=1: the gates are never used
        for g, leaf in zip(torch.autograd.grad(expected, leaves, grad_out, allow_unused=True), leaves, strict=True)
    ]
    for backend in BACKENDS:
        inputs = [a.clone().requires_grad_() for a in args]
        y = gspn_mix(*inputs, chunk_size=chunk_size, backend=backend)
        torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10, msg=f"{backend} forward")
        grads = torch.autograd.grad(y, inputs, grad_out)
        for name, got, want in zip(NAMES, grads, expected_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=f"{backend} d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_gradcheck(backend, chunk_size):
    args = [a.requires_grad_() for a in make(1, 3, 3, 4, 2, 1)]
    assert torch.autograd.gradcheck(
        lambda *a: gspn_mix(*a, chunk_size=chunk_size, backend=backend), args, eps=1e-6, atol=1e-7
    )


@pytest.mark.skipif("cpu" not in BACKENDS, reason="CPU kernel not built")
@pytest.mark.parametrize("chunk_size", [None, 3, 8])
@pytest.mark.parametrize("gate_channels", [40, 8, 1])
def test_cpu_matches_reference_at_larger_sizes(chunk_size, gate_channels):
    # Several 16-channel blocks plus a partial one, non-square, lines longer than a vector.
    args = make(2, 40, 11, 19, 5, gate_channels)
    leaves = [[a.clone().requires_grad_() for a in args] for _ in BACKENDS]
    outs = [gspn_mix(*ls, chunk_size=chunk_size, backend=b) for ls, b in zip(leaves, BACKENDS, strict=True)]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-11, atol=1e-11)
    grad_out = torch.randn_like(outs[0])
    for a, b in zip(*(torch.autograd.grad(o, ls, grad_out) for o, ls in zip(outs, leaves, strict=True)), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_is_computed_in_float32(backend, dtype):
    args = make(1, 8, 6, 5, 3, 8, dtype=torch.float64)
    want = gspn_mix(*args, backend="reference")
    got = gspn_mix(*(a.to(dtype) for a in args), backend=backend)
    assert got.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_empty_batch():
    args = make(0, 4, 3, 3, 2, 4)
    for backend in BACKENDS:
        y = gspn_mix(*args, backend=backend)
        assert y.shape == (0, 4, 3, 3)


# --- GSPN2d ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("gate_channels", [None, 2])
def test_gspn2d_fused_equals_unfused(chunk_size, gate_channels):
    torch.manual_seed(0)
    fused = GSPN2d(12, d_state=4, chunk_size=chunk_size, gate_channels=gate_channels).double()
    for p in fused.parameters():
        torch.nn.init.normal_(p, std=0.5)
    unfused = GSPN2d(12, d_state=4, chunk_size=chunk_size, gate_channels=gate_channels, fused=False).double()
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    unfused.load_state_dict(fused.state_dict())
    x = torch.randn(2, 12, 7, 9, dtype=torch.float64)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ys = [m(v) for m, v in zip((fused, unfused), xs, strict=True)]
    torch.testing.assert_close(ys[0], ys[1], rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ys[0])
    for y in ys:
        y.backward(g)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-9, atol=1e-10)
    for (name, p), q in zip(fused.named_parameters(), unfused.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-10, msg=name)


def test_gspn2d_accepts_channels_last_and_returns_channels_last():
    layer = GSPN2d(16, d_state=4)
    x = torch.randn(2, 16, 5, 6)
    y = layer(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y, layer(x))
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert "fused=False" in repr(GSPN2d(4, fused=False))


# --- operator contract ----------------------------------------------------------------------------


def _layouts(args):
    x, proxy, *weights = args
    b, c, h, w = x.shape

    def transposed(t):
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)

    def sliced(t):
        return torch.cat([t, t], -1)[..., ::2]

    yield "contiguous", args
    yield "channels_last", [t.contiguous(memory_format=torch.channels_last) for t in (x, proxy)] + weights
    yield "transposed", [transposed(x), transposed(proxy), *(transposed(t) if t.ndim > 1 else t for t in weights)]
    yield "expanded", [x[:1].expand(b, c, h, w), proxy[:1].expand_as(proxy), *weights]
    yield "sliced", [sliced(x), sliced(proxy), *(sliced(t) for t in weights)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_over_layouts(backend):
    args = make(2, 4, 3, 5, 2, 2, dtype=torch.float32)
    for name, case in _layouts(args):
        case = [t.detach().requires_grad_() if t.is_leaf else t for t in case]
        torch.library.opcheck(torch.ops.gspn.gspn_mix.default, (*case, 2, backend))
        grad = torch.randn(2, 4, 3, 5)
        detached = [t.detach() for t in case]
        torch.library.opcheck(torch.ops.gspn.gspn_mix_backward.default, (grad, *detached, None, backend))
        want = gspn_mix(*(t.contiguous() for t in detached), chunk_size=2, backend=backend)
        torch.testing.assert_close(gspn_mix(*detached, chunk_size=2, backend=backend), want, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_forward_and_backward(backend):
    args = make(2, 4, 3, 5, 2, 4, dtype=torch.float32)

    def f(x, z, *w):
        return gspn_mix(x.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2), z, *w, backend=backend).square().sum()

    leaves = [a.clone().requires_grad_() for a in args]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    compiled(*leaves).backward()
    eager = [a.clone().requires_grad_() for a in args]
    f(*eager).backward()
    for a, b in zip(leaves, eager, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_flop_formula_counts_generation_merge_and_scans():
    b, c, h, w, s, cg = 2, 8, 6, 5, 3, 4
    args = make(b, c, h, w, s, cg, dtype=torch.float32)
    with FlopCounterMode(display=False) as counter:
        gspn_mix(*args)
    count = counter.get_flop_counts()["Global"][torch.ops.gspn.gspn_mix]
    scans = 2 * scan_flops(b, c, h, w) + 2 * scan_flops(b, c, w, h)
    assert count == mix_flops(b, c, h, w, s, cg) == b * h * w * (s * (12 * cg + 12 * c) + 4 * c) + scans


def test_double_backward_is_refused_or_correct():
    args = [a.requires_grad_() for a in make(1, 2, 3, 3, 2, 2)]
    y = gspn_mix(*args, backend=BACKENDS[-1])
    (gx,) = torch.autograd.grad(y.sum(), args[0], create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()


# --- bad input ------------------------------------------------------------------------------------


def _bad(index, value):
    def call():
        args = make(2, 4, 3, 5, 2, 2, dtype=torch.float32)
        args[index] = value(args[index]) if callable(value) else value
        return gspn_mix(*args)

    return call


BAD = [
    ("x", ValueError, _bad(0, lambda t: t[0])),
    ("x", TypeError, _bad(0, lambda t: t.long())),
    ("x", ValueError, _bad(0, lambda t: t[:, :0])),
    ("proxy", ValueError, _bad(1, lambda t: t[..., :2])),
    ("proxy", ValueError, _bad(1, lambda t: t[:1])),
    ("proxy", TypeError, _bad(1, lambda t: t.double())),
    ("proxy", ValueError, _bad(1, lambda t: t.to("meta"))),
    ("gate_weight", ValueError, _bad(2, lambda t: t[:, :2])),
    ("gate_weight", ValueError, _bad(2, lambda t: torch.cat([t, t[:, :, :1]], 2))),  # Cg = 3 does not divide 4
    ("gate_weight", ValueError, _bad(2, lambda t: torch.cat([t, t], 3))),  # S mismatch
    ("lam_weight", ValueError, _bad(3, lambda t: t[:, :2])),
    ("u_weight", ValueError, _bad(4, lambda t: t[:3])),
    ("skip_weight", ValueError, _bad(5, lambda t: torch.cat([t, t], 2))),
    ("skip_weight", TypeError, _bad(5, lambda t: t.tolist())),
    ("merge_weight", ValueError, _bad(6, lambda t: t[:2])),
    ("chunk_size", ValueError, lambda: gspn_mix(*make(1, 2, 2, 2, 1, 2), chunk_size=0)),
    ("backend", ValueError, lambda: gspn_mix(*make(1, 2, 2, 2, 1, 2), backend="gpu")),
]


@pytest.mark.parametrize("argname,error,call", BAD, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(BAD)])
def test_bad_input_names_the_argument(argname, error, call):
    with pytest.raises(error, match=rf"\b{re.escape(argname)}\b"):
        call()


def test_public_api():
    assert gspn.ops.gspn_mix is gspn_mix


@pytest.mark.skipif("cpu" not in BACKENDS, reason="CPU kernel not built")
def test_cpu_kernel_is_deterministic_across_thread_counts():
    args = make(3, 35, 6, 7, 3, 5, dtype=torch.float32)
    grad = torch.randn(3, 35, 6, 7)
    saved = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            leaves = [a.clone().requires_grad_() for a in args]
            y = gspn_mix(*leaves, chunk_size=4, backend="cpu")
            results.append([y, *torch.autograd.grad(y, leaves, grad)])
    finally:
        torch.set_num_threads(saved)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="CPU kernel not built")
@pytest.mark.parametrize("layout", ["planar", "channels_last"])
def test_cpu_reads_dense_inputs_in_place(layout):
    # C a multiple of the kernel's 16 lanes: x is read where it is (no copy), NCHW or channels-last.
    # W = 37: the column scans of a planar x go through three staged 16-column strips, the last partial.
    args = make(2, 32, 5, 37, 3, 8)
    x = args[0] if layout == "planar" else args[0].contiguous(memory_format=torch.channels_last)
    strides = mix_cpu.mix_x_strides(x, 32)
    assert strides == ((32 * 185, 185, 1) if layout == "planar" else (32 * 185, 1, 32))
    leaves = [t.clone().requires_grad_() for t in (x, *args[1:])]
    expected = [t.clone().requires_grad_() for t in args]
    y, want = gspn_mix(*leaves, chunk_size=3, backend="cpu"), gspn_mix(*expected, chunk_size=3, backend="reference")
    torch.testing.assert_close(y, want, rtol=1e-11, atol=1e-11)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(want, expected, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="CPU kernel not built")
@pytest.mark.parametrize("layout", ["planar", "channels_last"])
@pytest.mark.parametrize(
    "shape",  # (B, C, H, W, S, Cg, chunk_size)
    [(2, 32, 5, 37, 3, 8, 3), (1, 40, 11, 19, 5, 40, None), (1, 16, 1, 9, 2, 16, None), (1, 16, 9, 1, 2, 4, 4)],
)
@pytest.mark.parametrize("gate_scale", [1.0, 400.0])
def test_cpu_float32_matches_the_float64_reference(layout, shape, gate_scale):
    # The float32 kernel (with AVX-512: 16-lane intrinsics, pixels of a line two at a time, an odd line
    # ending with one) against the float64 reference composition. gate_scale 400: logits of order 1e3,
    # where every valid sigmoid of many pixels underflows and the softmax fallback decides the weights.
    b, c, h, w, s, cg, chunk = shape
    args = make(b, c, h, w, s, cg)
    args[2] = args[2] * gate_scale
    expected = [t.clone().requires_grad_() for t in args]
    want = gspn_mix(*expected, chunk_size=chunk, backend="reference")
    single = [t.float() for t in args]
    if layout == "channels_last":
        single[0] = single[0].contiguous(memory_format=torch.channels_last)
    leaves = [t.clone().requires_grad_() for t in single]
    y = gspn_mix(*leaves, chunk_size=chunk, backend="cpu")
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    g = torch.randn_like(want)
    got = torch.autograd.grad(y, leaves, g.float())
    for name, a, e in zip(NAMES, got, torch.autograd.grad(want, expected, g), strict=True):
        # H = 1 or W = 1: some gate gradients are exactly 0 in float64, float32 rounding noise here
        scale = max(e.abs().max().item(), 1.0)
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-4 * scale, msg=name)
