"""Operator API: argument errors, stabilisation, stability theorem, torch.compile, FLOPs, backends."""

from __future__ import annotations

import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import gspn
from gspn.ops import DIRECTIONS, line_scan, line_scan_4d, scan_flops, stabilize
from gspn.ops.backends import resolve_backend


def inputs(shape=(2, 3, 4, 5), dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen, dtype=dtype) for _ in range(5)]


# --- bad input --------------------------------------------------------------------------------

BAD_CALLS = [
    ("x", ValueError, lambda x, l, a, b, c: line_scan(x[0], l, a, b, c)),
    ("w_mid", ValueError, lambda x, l, a, b, c: line_scan(x, l, a, b[None], c)),
    ("lam", ValueError, lambda x, l, a, b, c: line_scan(x, l[..., :3], a, b, c)),
    ("w_left", ValueError, lambda x, l, a, b, c: line_scan(x, l, a[:, :2], b, c)),  # 2 does not divide 3
    ("w_right", ValueError, lambda x, l, a, b, c: line_scan(x, l, a, b, torch.cat([c, c]))),  # batch 4 vs 2
    ("x", TypeError, lambda x, l, a, b, c: line_scan(x.long(), l, a, b, c)),
    ("lam", TypeError, lambda x, l, a, b, c: line_scan(x, l.to(torch.complex64), a, b, c)),
    ("w_left", TypeError, lambda x, l, a, b, c: line_scan(x, l, a.bool(), b, c)),
    ("x", TypeError, lambda x, l, a, b, c: line_scan(x.tolist(), l, a, b, c)),
    ("w_mid", ValueError, lambda x, l, a, b, c: line_scan(x, l, a, b.to("meta"), c)),
    ("chunk_size", ValueError, lambda x, l, a, b, c: line_scan(x, l, a, b, c, chunk_size=0)),
    ("chunk_size", ValueError, lambda x, l, a, b, c: line_scan(x, l, a, b, c, chunk_size=-2)),
    ("chunk_size", TypeError, lambda x, l, a, b, c: line_scan(x, l, a, b, c, chunk_size=2.0)),
    ("chunk_size", TypeError, lambda x, l, a, b, c: line_scan(x, l, a, b, c, chunk_size=True)),
    ("direction", ValueError, lambda x, l, a, b, c: line_scan(x, l, a, b, c, direction="up")),
    ("direction", TypeError, lambda x, l, a, b, c: line_scan(x, l, a, b, c, direction=0)),
    ("direction", TypeError, lambda x, l, a, b, c: line_scan(x, l, a, b, c, direction=None)),
    ("w_left", TypeError, lambda x, l, a, b, c: stabilize(a.long(), b, c)),
    ("w_right", TypeError, lambda x, l, a, b, c: stabilize(a, b, c.int())),
    ("w_mid", TypeError, lambda x, l, a, b, c: stabilize(a, b.tolist(), c)),
    ("normalize", TypeError, lambda x, l, a, b, c: line_scan(x, l, a, b, c, normalize="yes")),
    ("backend", ValueError, lambda x, l, a, b, c: line_scan(x, l, a, b, c, backend="cuda")),
    ("lam", ValueError, lambda x, l, a, b, c: line_scan_4d(x, l, a, b, c)),  # 4-D params for the 4d op
    (
        "w_left",
        ValueError,
        lambda x, l, a, b, c: line_scan_4d(x, l[:, None], torch.stack([a] * 3, 1), b[:, None], c[:, None]),
    ),  # 3 directions
]


@pytest.mark.parametrize(
    "argname,error,call", BAD_CALLS, ids=[f"{a}-{e.__name__}-{i}" for i, (a, e, _) in enumerate(BAD_CALLS)]
)
def test_bad_input_names_the_argument(argname, error, call):
    with pytest.raises(error, match=rf"\b{re.escape(argname)}\b"):
        call(*inputs())


def test_unavailable_backend_is_a_clear_error():
    with pytest.raises(RuntimeError, match="backend 'cpu'"):
        resolve_backend("cpu", torch.device("meta"))


ALLOWED_DIRECTIONS = re.escape(repr(DIRECTIONS))
ALLOWED_BACKENDS = re.escape("('auto', 'reference', 'cpu', 'triton')")


def test_errors_list_the_allowed_values(monkeypatch):
    x, lam, wl, wm, wr = inputs()
    with pytest.raises(TypeError, match=rf"direction must be one of {ALLOWED_DIRECTIONS}"):
        line_scan(x, lam, wl, wm, wr, direction=None)
    with pytest.raises(TypeError, match=r"w_left must be a real floating-point tensor \(float16, .*int64"):
        stabilize(wl.long(), wm, wr)
    with pytest.raises(ValueError, match=rf"backend must be one of {ALLOWED_BACKENDS}, got 'cuda'"):
        torch.ops.gspn.line_scan(x, lam, wl, wm, wr, "tb", None, False, "cuda")  # the operator itself too
    monkeypatch.setenv("GSPN_BACKEND", "fast")
    for call in (
        lambda: line_scan(x, lam, wl, wm, wr),
        lambda: line_scan_4d(x, *(p[:, None] for p in (lam, wl, wm, wr))),
        lambda: resolve_backend("auto", torch.device("cpu")),
    ):
        with pytest.raises(ValueError, match=rf"GSPN_BACKEND must be one of {ALLOWED_BACKENDS}, got 'fast'"):
            call()
    line_scan(x, lam, wl, wm, wr, backend="reference")  # an explicit backend does not read the variable
    monkeypatch.setenv("GSPN_BACKEND", "")  # empty: as if unset
    assert resolve_backend("auto", torch.device("cpu")).__name__ == "gspn.ops.line_scan.cpu"


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_largest_int64_chunk_size_is_global(backend):
    """A chunk at least as long as the scan axis is one tile, up to the largest int64."""
    x, lam, wl, wm, wr = (t.double().requires_grad_() for t in inputs((1, 2, 5, 4)))
    for direction in ("bt", "lr"):
        got = line_scan(x, lam, wl, wm, wr, direction=direction, chunk_size=2**63 - 1, normalize=True, backend=backend)
        want = line_scan(x, lam, wl, wm, wr, direction=direction, normalize=True, backend=backend)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        g = torch.randn_like(got)
        got_grads = torch.autograd.grad(got, (x, lam, wl), g)
        torch.testing.assert_close(got_grads, torch.autograd.grad(want, (x, lam, wl), g))
    params = [p[:, None] for p in (lam, wl, wm, wr)]
    got = line_scan_4d(x, *params, chunk_size=2**63 - 1, backend=backend)
    torch.testing.assert_close(got, line_scan_4d(x, *params, backend=backend), rtol=0, atol=0)


@pytest.mark.parametrize("chunk_size", [2**63, 2**100])
def test_chunk_size_past_int64_is_an_error_naming_the_range(chunk_size):
    x, lam, wl, wm, wr = inputs((1, 2, 5, 4))
    with pytest.raises(ValueError, match=r"chunk_size must be None \(global\) or an int in \[1, 2\*\*63 - 1\]"):
        line_scan(x, lam, wl, wm, wr, chunk_size=chunk_size)
    with pytest.raises(ValueError, match=r"chunk_size"):
        line_scan_4d(x, *(p[:, None] for p in (lam, wl, wm, wr)), chunk_size=chunk_size)
    with pytest.raises(ValueError, match=r"chunk_size"):
        gspn.ops.gspn_mix(
            x, x[:, :1], torch.zeros(4, 3, 2, 1), *[torch.zeros(4, 2, 1)] * 3, torch.zeros(4), chunk_size=chunk_size
        )


def test_zero_channels_is_an_error_naming_x():
    x, lam, wl, wm, wr = inputs((2, 0, 3, 4))
    with pytest.raises(ValueError, match=r"x has C = 0 channels .*C must be >= 1"):
        line_scan(x, lam, wl, wm, wr)
    with pytest.raises(ValueError, match=r"x has C = 0 channels"):
        line_scan_4d(x, *(p[:, None] for p in (lam, wl, wm, wr)))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_empty_batch_or_plane_gives_empty_results_and_zero_gradients(backend):
    """B = 0, H = 0 or W = 0 is a valid empty input for every operator: empty results, zero gradients
    of each parameter's own shape."""
    for shape in ((0, 2, 3, 4), (2, 2, 0, 4), (2, 2, 3, 0)):
        b, c, h, w = shape
        x = torch.randn(shape, requires_grad=True)
        lam = torch.randn(1, c, h, w, requires_grad=True)
        wl, wm, wr = (torch.randn(b, 1 if i else c, h, w, requires_grad=True) for i in range(3))
        out = line_scan(x, lam, wl, wm, wr, direction="lr", chunk_size=2, normalize=True, backend=backend)
        assert out.shape == shape
        grads = torch.autograd.grad(out.sum(), (x, lam, wl, wm, wr))
        for g, t in zip(grads, (x, lam, wl, wm, wr), strict=True):
            assert g.shape == t.shape and g.eq(0).all()
        params = [p.unsqueeze(1) for p in (lam, wl, wm, wr)]
        out4 = line_scan_4d(x, *params, normalize=True, backend=backend)
        assert out4.shape == (b, 4, c, h, w)
        grads = torch.autograd.grad(out4.sum(), (x, *params))
        assert all(g.shape == t.shape and g.eq(0).all() for g, t in zip(grads, (x, *params), strict=True))
        weights = stabilize(wl.detach(), wm.detach(), wr.detach(), direction="tb")
        assert all(t.shape == (b, c, h, w) for t in weights)
    x, lam, wl, wm, wr = inputs((0, 2, 3, 4), dtype=torch.float64)
    torch.library.opcheck(torch.ops.gspn.line_scan.default, (x, lam, wl, wm, wr, "tb", None, True, backend))


# --- stabilisation ----------------------------------------------------------------------------


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_stabilize_is_a_distribution_over_existing_neighbours(direction):
    wl, wm, wr = (torch.randn(2, 3, 4, 6) * 5 for _ in range(3))
    nl, nm, nr = stabilize(wl, wm, wr, direction=direction)
    assert (nl >= 0).all() and (nm >= 0).all() and (nr >= 0).all()
    torch.testing.assert_close(nl + nm + nr, torch.ones_like(nl))
    line_dim = -1 if direction in ("tb", "bt") else -2
    assert nl.select(line_dim, 0).eq(0).all()
    assert nr.select(line_dim, -1).eq(0).all()
    # away from the border it is sigmoid / sum of sigmoids
    s = [torch.sigmoid(t) for t in (wl, wm, wr)]
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    torch.testing.assert_close(nm[inner], (s[1] / (s[0] + s[1] + s[2]))[inner])


def test_stabilize_extreme_logits_stay_finite():
    logits = [torch.full((1, 1, 3, 3), v, dtype=torch.float64) for v in (-1000.0, -1001.0, -1002.0)]
    weights = stabilize(*logits, direction="tb")
    total = sum(weights)
    assert all(torch.isfinite(w).all() for w in weights)
    torch.testing.assert_close(total, torch.ones_like(total))
    # equal to a softmax of the logits over the existing neighbours
    e = torch.exp(torch.tensor([0.0, -1.0, -2.0], dtype=torch.float64))
    torch.testing.assert_close(weights[1][0, 0, 1, 1], e[1] / e.sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 30.0, 200.0])
def test_fused_normalisation_matches_stabilize(scale, dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 7, 9, generator=gen, dtype=dtype)
    lam = torch.randn(1, 2, 7, 9, generator=gen, dtype=dtype)
    logits = [(torch.randn(1, 2, 7, 9, generator=gen, dtype=dtype) - 0.5 * scale) * scale for _ in range(3)]
    for direction in DIRECTIONS:
        fused = line_scan(x, lam, *logits, direction=direction, normalize=True, backend="cpu")
        explicit = line_scan(x, lam, *stabilize(*logits, direction=direction), direction=direction, backend="cpu")
        torch.testing.assert_close(fused, explicit, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)


# --- the stability–context condition ----------------------------------------------------------


def test_normalised_long_scan_is_stable_raw_weights_above_one_diverge():
    lines = 16_384
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 2, lines, 8, generator=gen) * 2 - 1  # |x| <= 1
    lam = torch.ones_like(x)
    logits = [torch.randn(1, 2, lines, 8, generator=gen) * 3 for _ in range(3)]

    h = line_scan(x, lam, *logits, direction="tb", normalize=True)
    # valid weights are >= 0 and sum to 1, so |h_l| <= max|h_{l-1}| + max|lam x|  =>  |h| <= lines
    assert torch.isfinite(h).all()
    assert h.abs().max() <= lines
    # and, in fact, the state neither explodes nor vanishes: it stays at the input's scale
    assert 0.1 < h[..., -1000:, :].abs().mean() < 50

    raw = [torch.full_like(x, 0.5) for _ in range(3)]  # weights sum to 1.5 > 1
    diverged = line_scan(x.abs(), lam, *raw, direction="tb", normalize=False)
    assert not torch.isfinite(diverged[..., -1, :]).all() or diverged.abs().max() > 1e30


# --- autograd graph, compile, FLOPs -----------------------------------------------------------


def test_backward_is_one_node_not_one_per_line():
    x, lam, wl, wm, wr = (t.requires_grad_() for t in inputs((1, 2, 64, 8)))
    out = line_scan(x, lam, wl, wm, wr)
    assert len(out.grad_fn.next_functions) == 5
    assert all(type(fn).__name__ == "AccumulateGrad" for fn, _ in out.grad_fn.next_functions)


def test_opcheck():
    x, lam, wl, wm, wr = (t.double().requires_grad_() for t in inputs((1, 2, 3, 4)))
    torch.library.opcheck(torch.ops.gspn.line_scan.default, (x, lam, wl, wm, wr, "lr", 2, True, "cpu"))
    params = [p[:, None].expand(1, 4, 2, 3, 4).contiguous().requires_grad_() for p in (lam, wl, wm, wr)]
    torch.library.opcheck(torch.ops.gspn.line_scan_4d.default, (x, *params, None, False, "reference"))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    x, lam, wl, wm, wr = (t.requires_grad_() for t in inputs((1, 2, 6, 5)))

    def fn(x, lam, wl, wm, wr):
        return line_scan(x * 2, lam, wl, wm, wr, direction="rl", chunk_size=2, normalize=True).sin()

    compiled = torch.compile(fn, fullgraph=True, backend=compiler)
    out = compiled(x, lam, wl, wm, wr)
    torch.testing.assert_close(out, fn(x, lam, wl, wm, wr))
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_flop_counter_counts_the_scan():
    x, lam, wl, wm, wr = (t.requires_grad_() for t in inputs((2, 3, 4, 5)))
    with FlopCounterMode(display=False) as counter:
        line_scan(x, lam, wl, wm, wr, direction="tb")
    assert counter.get_total_flops() == scan_flops(2, 3, 4, 5) == 2 * 3 * 3 * (7 * 5 - 4)
    with FlopCounterMode(display=False) as counter:
        line_scan(x, lam, wl, wm, wr, direction="lr")
    assert counter.get_total_flops() == scan_flops(2, 3, 5, 4)
    params = [p[:, None].expand(2, 4, 3, 4, 5) for p in (lam, wl, wm, wr)]
    with FlopCounterMode(display=False) as counter:
        out = line_scan_4d(x, *params)
    assert counter.get_total_flops() == 2 * scan_flops(2, 3, 4, 5) + 2 * scan_flops(2, 3, 5, 4)
    with FlopCounterMode(display=False) as counter:
        out.sum().backward()
    assert counter.get_total_flops() > 0


# --- backends ---------------------------------------------------------------------------------


def test_auto_picks_the_cpu_backend_and_env_override(monkeypatch):
    assert {"reference", "cpu"} <= set(gspn.ops.available_backends("cpu"))
    assert resolve_backend("auto", torch.device("cpu")).__name__ == "gspn.ops.line_scan.cpu"
    monkeypatch.setenv("GSPN_BACKEND", "reference")
    assert resolve_backend("auto", torch.device("cpu")).__name__ == "gspn.ops.line_scan.reference"


@pytest.mark.parametrize("name", ["reference", "cpu", "triton"])
def test_backend_modules_satisfy_the_protocol(name):
    """Every backend module has every member of ``ScanBackend`` (``isinstance``) with the protocol's
    parameter names and kinds (``inspect``), so nothing needs probing with ``getattr``."""
    import importlib
    import inspect

    from gspn.ops.backends import backend_names
    from gspn.ops.line_scan import ScanBackend

    assert backend_names() == ("auto", "reference", "cpu", "triton")
    module = importlib.import_module(f"gspn.ops.line_scan.{name}")
    assert isinstance(module, ScanBackend)
    assert isinstance(module.NATIVE_DTYPES, bool)
    for member in ("is_available", "unavailable_reason", "allocate", "scan", "scan_backward"):
        want = list(inspect.signature(getattr(ScanBackend, member)).parameters.values())[1:]  # without self
        got = list(inspect.signature(getattr(module, member)).parameters.values())
        assert [(p.name, p.kind) for p in got] == [(p.name, p.kind) for p in want], (name, member)
    reason = module.unavailable_reason(torch.device("cpu"))
    assert isinstance(reason, str) and (reason == "") == module.is_available(torch.device("cpu"))
    buffer = module.allocate((2, 3), torch.float64, torch.device("cpu"))
    assert buffer.shape == (2, 3) and buffer.dtype == torch.float64


def test_resolve_backend_returns_a_scan_backend():
    from gspn.ops.line_scan import ScanBackend

    for name in ("auto", "reference", "cpu"):
        assert isinstance(resolve_backend(name, torch.device("cpu")), ScanBackend)
    with pytest.raises(RuntimeError, match=r"backend 'triton' is not available for meta tensors: .*meta"):
        resolve_backend("triton", torch.device("meta"))


def test_threads_do_not_change_results():
    x, lam, wl, wm, wr = inputs((2, 8, 17, 19))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = line_scan_4d(x, *(p[:, None] for p in (lam, wl, wm, wr)), normalize=True, backend="cpu")
        torch.set_num_threads(2)
        two = line_scan_4d(x, *(p[:, None] for p in (lam, wl, wm, wr)), normalize=True, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_without_a_compiler_auto_falls_back_and_cpu_explains(tmp_path):
    import os
    import subprocess
    import sys

    script = """
import warnings, torch, gspn
x = torch.randn(1, 2, 3, 4)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = gspn.ops.line_scan(x, x, x, x, x)
assert any("falling back" in str(w.message) for w in caught), [str(w.message) for w in caught]
torch.testing.assert_close(out, gspn.ops.line_scan(x, x, x, x, x, backend="reference"))
try:
    gspn.ops.line_scan(x, x, x, x, x, backend="cpu")
except RuntimeError as e:
    assert "backend 'cpu'" in str(e) and "compiler" in str(e), str(e)
else:
    raise AssertionError("expected a RuntimeError")
"""
    env = dict(os.environ, CXX=str(tmp_path / "missing-cxx"), GSPN_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
