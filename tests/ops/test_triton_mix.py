"""The Triton backend of ``gspn.ops.gspn_mix`` (fused forward kernels, per-direction recomputing
backward) against the float64 reference backend: output and all seven gradients.

Without a GPU the kernels run on CPU tensors through the Triton interpreter, set up as in
``tests/ops/test_triton.py``: ``TRITON_INTERPRET=1`` only around this module's import of triton and,
through a module-scoped fixture, while its tests run, so that it does not leak into other modules.
The interpreter supports float64, so the float64 comparisons are tight (1e-10); float32, bfloat16
and float16 inputs are compared with the float64 result at stated tolerances. Shapes are small and
some launches are forced small (``gspn.ops._triton.launch_overrides``) so that several programs, partial slice
tiles, tiles of a local scan shared by two programs and the memory variant's multi-block lines
are exercised. The interpreter runs programs one after another: it cannot catch a missing barrier
or a race; only a GPU run can.
"""

from __future__ import annotations

import os

import pytest
import torch

_SET_INTERPRET = not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ
if _SET_INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    triton = pytest.importorskip("triton")
    from gspn.ops.gspn_mix import kernels  # noqa: F401  (its kernels are defined while TRITON_INTERPRET is set)
finally:
    if _SET_INTERPRET:
        del os.environ["TRITON_INTERPRET"]

from gspn.ops import _triton as triton_launch  # noqa: E402
from gspn.ops import gspn_mix  # noqa: E402
from gspn.ops.gspn_mix import triton as triton_backend  # noqa: E402

NAMES = ("y", "dx", "dproxy", "d_gate_weight", "d_lam_weight", "d_u_weight", "d_skip_weight", "d_merge_weight")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module", autouse=True)
def _interpreter_without_gpu():
    """Run the kernels through the Triton interpreter (no CUDA device) while this module runs."""
    if not _SET_INTERPRET:
        yield
        return
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        os.environ.pop("TRITON_INTERPRET", None)


@pytest.fixture(autouse=True)
def _available():
    if not triton_backend.is_available(DEVICE):
        pytest.skip(f"triton backend unavailable: {triton_backend.unavailable_reason(DEVICE)}")


def make(batch, channels, height, width, state, gate_channels, dtype=torch.float64, seed=0):
    """``(x, proxy, gate_weight, lam_weight, u_weight, skip_weight, merge_weight)``, float64 on CPU
    then cast; gate logits of scale 2 so the normalisation is far from uniform."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)

    return [
        rand(batch, channels, height, width),
        rand(batch, state, height, width),
        rand(4, 3, gate_channels, state, scale=2.0),
        rand(4, channels, state, scale=0.5),
        rand(4, channels, state),
        rand(4, channels, state),
        rand(4),
    ]


def _value_and_grads(args, chunk_size, backend, grad_out=None, device="cpu"):
    leaves = [a.detach().to(device).requires_grad_() for a in args]
    y = gspn_mix(*leaves, chunk_size=chunk_size, backend=backend)
    if grad_out is None:
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(y, leaves, grad_out.to(device=device, dtype=y.dtype))
    return [y.detach().cpu(), *(g.cpu() for g in grads)], grad_out


def _compare(args, chunk_size, rtol=1e-10, atol=1e-10, overrides=None, backward=True):
    """Triton (with ``overrides``) and float64 reference: the output and (if ``backward``) all
    seven gradients; tolerances relative to each tensor's largest magnitude."""
    args64 = [a.double() for a in args]
    if backward:
        want, grad_out = _value_and_grads(args64, chunk_size, "reference")
        with triton_launch.launch_overrides(**(overrides or {})):
            got, _ = _value_and_grads(args, chunk_size, "triton", grad_out, DEVICE)
    else:
        want = [gspn_mix(*args64, chunk_size=chunk_size, backend="reference")]
        with triton_launch.launch_overrides(**(overrides or {})):
            got = [gspn_mix(*(a.to(DEVICE) for a in args), chunk_size=chunk_size, backend="triton").cpu()]
    for name, g, w in zip(NAMES, got, want, strict=False):
        assert g.dtype == args[0].dtype and g.shape == w.shape, name
        scale = max(w.abs().max().item(), 1.0)
        torch.testing.assert_close(g.double(), w, rtol=rtol, atol=atol * scale, msg=lambda m, n=name: f"{n}: {m}")


CASES = {  # (B, C, H, W, S, Cg, chunk_size)
    "global, batch 2, non-square": (2, 3, 4, 5, 2, 3, None),
    "chunk 3 not dividing 7, one shared gate": (1, 4, 7, 3, 2, 1, 3),
    "H = 1": (1, 3, 1, 5, 2, 3, None),
    "W = 1, chunk 3": (1, 2, 5, 1, 2, 2, 3),
    "chunk 1 (no propagation)": (1, 2, 3, 2, 1, 1, 1),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_matches_reference_float64(case):
    """Default launch (interpreter: register variant, all slices in one program; the fused backward)."""
    *shape, chunk_size = case
    _compare(make(*shape), chunk_size)


def test_backward_fused_with_several_programs():
    """The fused backward with 2-channel groups over C = 3 (a partial group; the proxy partials of two
    groups summed) and the tiles of a local scan shared by two programs (weight partials summed)."""
    _compare(make(1, 3, 5, 4, 2, 3, seed=5), 2, overrides={"block_s": 2, "chunk_programs": 2})


def test_backward_by_scans():
    """``kernel="memory"`` forces the memory forward and the backward's fallback (the case of lines
    longer than a register block): recomputation through the line-scan kernels."""
    _compare(make(1, 3, 4, 5, 2, 1, seed=6), 3, overrides={"kernel": "memory"})


# Forward with several programs: 4-slice groups over B·C = 6 (a partial group), the tiles of a local
# scan shared by two programs; the memory variant with 2-position blocks (lines of 3 and 5 span 2-3
# blocks).
VARIANTS = {
    "register": {"kernel": "register", "block_s": 4, "chunk_programs": 2},
    "memory": {"kernel": "memory", "block_p": 2, "block_s": 4, "chunk_programs": 2},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_with_several_programs(variant):
    _compare(make(1, 6, 5, 3, 2, 3, seed=2), 2, overrides=VARIANTS[variant], backward=False)


@pytest.mark.parametrize(
    "dtype, tol, shape",
    [
        (torch.float32, 2e-5, (1, 4, 4, 5, 3, 2)),
        (torch.bfloat16, 5e-2, (1, 2, 3, 4, 2, 1)),
        (torch.float16, 5e-3, (1, 2, 3, 4, 2, 2)),
    ],
    ids=str,
)
def test_low_precision_against_float64(dtype, tol, shape):
    """Inputs rounded to ``dtype``, compared with the float64 result of the rounded inputs: the
    kernels read them natively and accumulate in float32, results are rounded to ``dtype``.
    Tolerances relative to each tensor's largest magnitude: about the rounding of the result
    (bfloat16 8 bits, float16 11 bits)."""
    args = [a.to(dtype) for a in make(*shape, seed=3)]
    _compare(args, 2, rtol=tol, atol=tol)


def test_layouts_read_in_place():
    """Channels-last, transposed, expanded and strided inputs give the contiguous result; y is
    channels-last."""
    args = make(2, 4, 3, 5, 2, 2, seed=4)
    x, proxy, *weights = args

    def transposed(t):
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)

    def sliced(t):
        return torch.cat([t, t], -1)[..., ::2]

    layouts = {
        "channels_last": (
            x.contiguous(memory_format=torch.channels_last),
            proxy.contiguous(memory_format=torch.channels_last),
        ),
        "transposed": (transposed(x), transposed(proxy)),
        "sliced": (sliced(x), sliced(proxy)),
        "expanded": (x[:1].expand_as(x), proxy[:1].expand_as(proxy)),
    }
    for name, (xv, zv) in layouts.items():
        want = gspn_mix(xv.contiguous(), zv.contiguous(), *weights, chunk_size=2, backend="reference")
        y = gspn_mix(xv.to(DEVICE), zv.to(DEVICE), *(w.to(DEVICE) for w in weights), chunk_size=2, backend="triton")
        assert y.is_contiguous(memory_format=torch.channels_last), name
        torch.testing.assert_close(y.cpu(), want, rtol=1e-10, atol=1e-10, msg=name)


def test_opcheck():
    """The ``torch.library`` contract (fake kernels, schema, autograd registration) with the Triton
    backend."""
    args = [a.to(DEVICE) for a in make(1, 2, 3, 2, 2, 1, dtype=torch.float32)]
    leaves = [a.requires_grad_() for a in args]
    torch.library.opcheck(
        torch.ops.gspn.gspn_mix.default,
        (*leaves, 2, "triton"),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def test_empty_and_unknown_override():
    args = [a.to(DEVICE) for a in make(0, 4, 3, 3, 2, 4)]
    assert gspn_mix(*args, backend="triton").shape == (0, 4, 3, 3)
    with pytest.raises(ValueError, match="unknown launch parameters"), triton_launch.launch_overrides(size=3):
        pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lines_of_one_pixel_give_exactly_zero_gate_gradients(dtype):
    """W = 1: the row scans (directions 0, 1) have lines of one pixel; H = 1: the column scans. Their
    gate-weight gradients are exactly 0, even for gate weights of order 10² (cpu: test_nonfinite.py)."""
    for (h, w), flat in [((6, 1), slice(0, 2)), ((1, 6), slice(2, 4))]:
        args = make(2, 5, h, w, 3, 5, dtype=dtype)
        args[2] = args[2] * 200
        values, _ = _value_and_grads(args, None, "triton")
        assert values[3][flat].eq(0).all()


def test_forward_mode_tangent_matches_reference():
    """torch.func.jvp through the triton backend equals the reference backend's (issue 21, kind 4)."""
    primals = make(2, 3, 4, 5, 2, 3)
    tangents = make(2, 3, 4, 5, 2, 3, seed=7)

    def run(backend):
        return torch.func.jvp(lambda *a: gspn_mix(*a, chunk_size=3, backend=backend), tuple(primals), tuple(tangents))[
            1
        ]

    got = run("triton")
    torch.testing.assert_close(got, run("reference"), rtol=1e-10, atol=1e-10)
    assert got.abs().max() > 0.01
