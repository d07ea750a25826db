"""The Triton backend against the reference backend: forward and all five gradients.

Without a GPU the kernels run on CPU tensors through the Triton interpreter. ``TRITON_INTERPRET``
has to be set before triton is imported (triton's own ``@jit`` helpers such as ``tl.sum`` are
created at import), but it should not leak into the other test modules (it makes the backend
available on CPU): so this module sets it only around its import of triton and, through a
module-scoped fixture, while its own tests run. With a GPU the same tests also run on ``cuda``
(parameters marked ``gpu``). Shapes are small and the launch parameters are forced small
(``launch_overrides``) so that the multi-block line loop and the split over tiles are exercised
while the interpreter runs few programs.
"""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

_SET_INTERPRET = not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ
if _SET_INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    triton = pytest.importorskip("triton")
finally:
    if _SET_INTERPRET:
        del os.environ["TRITON_INTERPRET"]

import inert_gates  # noqa: E402
from gspn.ops import DIRECTIONS, available_backends, line_scan, line_scan_4d  # noqa: E402
from gspn.ops import _triton as triton_launch  # noqa: E402
from gspn.ops.line_scan import triton as triton_surface  # noqa: E402
from oracle import unused_gates  # noqa: E402

TOL = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
    torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
    torch.float16: {"atol": 4e-3, "rtol": 4e-3},
}
# Launch parameters per kernel variant: "memory" with 4-position blocks (lines span several
# blocks) and "register" (whole line in registers); both split the tiles over two programs.
VARIANTS = {
    "memory": {"kernel": "memory", "block_p": 4, "block_s": 4, "chunk_programs": 2},
    "register": {"kernel": "register", "block_s": 4, "chunk_programs": 2},
    # Lines cut into 4-position segments with 2-position halos (2-line time blocks), 4 slices
    # per program.
    "split": {"kernel": "split", "block_p": 8, "halo": 2, "block_s": 4},
}
SMALL = VARIANTS["memory"]


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


@pytest.fixture(params=sorted(VARIANTS))
def variant(request) -> dict:
    return VARIANTS[request.param]


@pytest.fixture(
    params=[
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
        ),
    ]
)
def device(request) -> torch.device:
    dev = torch.device(request.param)
    if not triton_surface.is_available(dev):
        pytest.skip(f"triton backend unavailable on {dev}: {triton_surface.unavailable_reason(dev)}")
    return dev


def _make(shape, param_shapes, dtype, device, seed=0, scale=0.5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    params = [(scale * torch.randn(s, generator=gen)).to(device=device, dtype=dtype) for s in param_shapes]
    return x, params


def _run(fn, x, params, grad_seed=1, **kwargs):
    """Output and the gradients of x and the four parameters for a fixed random cotangent."""
    x = x.detach().clone().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in params]
    y = fn(x, *params, **kwargs)
    gen = torch.Generator().manual_seed(grad_seed)
    g = torch.randn(y.shape, generator=gen).to(device=y.device, dtype=y.dtype)
    y.backward(g)
    return [y.detach(), x.grad, *(p.grad for p in params)]


def _assert_close(got, want, dtype):
    names = ("h", "dx", "dlam", "dw_left", "dw_mid", "dw_right")
    for name, a, b in zip(names, got, want, strict=True):
        assert a.dtype == b.dtype, name
        assert a.shape == b.shape, name
        torch.testing.assert_close(a.float().cpu(), b.float().cpu(), **TOL[dtype], msg=lambda m, n=name: f"{n}: {m}")


def _compare(shape, param_shapes, dtype, device, fn=line_scan, overrides=None, scale=0.5, **kwargs):
    x, params = _make(shape, param_shapes, dtype, device, scale=scale)
    with triton_launch.launch_overrides(**(SMALL if overrides is None else overrides)):
        got = _run(fn, x, params, backend="triton", **kwargs)
    want = _run(fn, x.cpu(), [p.cpu() for p in params], backend="reference", **kwargs)
    _assert_close(got, want, dtype)


def test_available_under_interpreter(device):
    assert "triton" in available_backends(device)
    assert triton_surface.NATIVE_DTYPES


def test_unsupported_device_reason():
    assert "meta" in triton_surface.unavailable_reason("meta")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_matches_reference(device, variant, direction, chunk_size, normalize, dtype):
    """Every direction, global and chunked (3 does not divide 7 or 5), normalize on/off, each dtype."""
    shape = (2, 3, 7, 5)
    kwargs = {"direction": direction, "chunk_size": chunk_size, "normalize": normalize}
    _compare(shape, [shape] * 4, dtype, device, overrides=variant, **kwargs)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_broadcast_gates(device, variant, direction, normalize):
    """Batch-shared and channel-group-shared parameters.

    Without normalisation each parameter has its own layout; with it the three gates share one
    (the reference backend's ``stabilize`` needs equal gate shapes).
    """
    shape = (2, 6, 5, 6)
    if normalize:
        param_shapes = [(1, 6, 5, 6), (1, 2, 5, 6), (1, 2, 5, 6), (1, 2, 5, 6)]
    else:
        param_shapes = [(1, 6, 5, 6), (2, 3, 5, 6), (1, 1, 5, 6), (2, 2, 5, 6)]
    kwargs = {"direction": direction, "chunk_size": 2, "normalize": normalize}
    _compare(shape, param_shapes, torch.float32, device, overrides=variant, **kwargs)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 2, 1, 6), (2, 2, 6, 1), (1, 2, 1, 9)])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_degenerate_shapes(device, variant, direction, shape):
    """H = 1 and/or W = 1: lines of length 1 and single-line scans."""
    for chunk_size, normalize in ((None, True), (2, False)):
        kwargs = {"direction": direction, "chunk_size": chunk_size, "normalize": normalize}
        _compare(shape, [shape] * 4, torch.float32, device, overrides=variant, **kwargs)


@pytest.mark.parametrize("kernel", ["auto", "register", "split"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_line_longer_than_block(device, direction, kernel):
    """A 300-long line: with the default config the interpreter's memory variant loops over 256-wide
    blocks; the register variant holds it in one 512-wide block; the split variant shares it
    between 7 programs (48-position segments, 8-position halos) over 2 time blocks."""
    vertical = direction in ("tb", "bt")
    shape = (1, 2, 12, 300) if vertical else (1, 2, 300, 12)
    overrides = {
        "auto": {},
        "register": {"kernel": "register"},
        "split": {"kernel": "split", "block_p": 64, "halo": 8},
    }[kernel]
    kwargs = {"direction": direction, "normalize": True}
    _compare(shape, [shape] * 4, torch.bfloat16, device, overrides=overrides, **kwargs)


def test_launch_config_choice(monkeypatch):
    cpu = torch.device("cpu")
    assert triton_launch.launch_config(6, 200, 1, cpu, 400)["kernel"] == "register"
    long_line = triton_launch.launch_config(6, 300, 1, cpu, 600)
    assert long_line["kernel"] == "memory" and long_line["block_p"] == 256
    split = triton_launch.launch_config(6, 300, 1, cpu, 600, kernel="split")
    assert (split["kernel"], split["block_p"], split["halo"], split["block_s"]) == ("split", 256, 16, 1)
    with triton_launch.launch_overrides(kernel="split", block_p=8, halo=3), pytest.raises(ValueError, match="halo"):
        triton_launch.launch_config(6, 300, 1, cpu, 600)
    monkeypatch.setenv("GSPN_TRITON_KERNEL", "memory")
    assert triton_launch.launch_config(6, 8, 1, cpu, 16)["kernel"] == "memory"
    monkeypatch.setenv("GSPN_TRITON_KERNEL", "fast")
    with pytest.raises(ValueError, match="GSPN_TRITON_KERNEL"):
        triton_launch.launch_config(6, 8, 1, cpu, 16)
    with pytest.raises(ValueError, match="unknown launch parameters"):
        triton_launch.launch_overrides(size=3).__enter__()


@pytest.mark.parametrize("normalize", [False, True])
def test_line_scan_4d(device, variant, normalize):
    """Four directions into strided ``out[:, k]`` views, per-direction and direction-shared gates."""
    shape = (2, 4, 5, 6)
    param_shapes = [(2, 4, 4, 5, 6), (1, 1, 2, 5, 6), (1, 1, 2, 5, 6), (1, 1, 2, 5, 6)]
    for dtype, chunk_size in ((torch.bfloat16, 4), (torch.float32, None)):
        kwargs = {"chunk_size": chunk_size, "normalize": normalize}
        _compare(shape, param_shapes, dtype, device, fn=line_scan_4d, overrides=variant, **kwargs)


def test_mixed_and_double_dtypes(device, variant):
    """bf16 x with float32 gates gives a float32 result; float64 runs with float64 state."""
    shape = (1, 2, 4, 5)
    x, params = _make(shape, [shape] * 4, torch.float32, device)
    xb = x.to(torch.bfloat16)
    with triton_launch.launch_overrides(**variant):
        got = _run(line_scan, xb, params, backend="triton", direction="lr", normalize=True)
    cpu_params = [p.cpu() for p in params]
    want = _run(line_scan, xb.cpu(), cpu_params, backend="reference", direction="lr", normalize=True)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    _assert_close(got, want, torch.bfloat16)
    _compare(shape, [shape] * 4, torch.float64, device, overrides=variant, direction="rl", chunk_size=3, normalize=True)


def test_extreme_logits_stay_finite(device):
    """Fused normalisation with logits far in both tails (all sigmoids underflow) stays finite."""
    shape = (1, 2, 4, 5)
    x, params = _make(shape, [shape] * 4, torch.float32, device, scale=200.0)
    _compare(shape, [shape] * 4, torch.float32, device, scale=200.0, direction="tb", normalize=True)
    with triton_launch.launch_overrides(**SMALL):
        got = _run(line_scan, x, params, backend="triton", direction="bt", normalize=True)
    assert all(torch.isfinite(t).all() for t in got)


@pytest.mark.parametrize("normalize", [False, True])
def test_unused_gates_never_influence(device, variant, normalize):
    """NaN/±Inf in gates whose neighbour does not exist (w_left at the first position of a line,
    w_right at the last, all gates on a line that starts a tile) change nothing, bit for bit, and
    get exactly zero gradient (the rule of docs/operator.md; reference and cpu: test_nonfinite.py)."""
    shape = (1, 2, 4, 5)
    tensors = [t.float().to(device) for t in inert_gates.inputs(shape)]
    for direction in DIRECTIONS:
        inert_gates.check_unused_gates_are_inert(
            line_scan,
            tensors,
            unused_gates(4, 5, direction, 3),
            "triton",
            context=lambda: triton_launch.launch_overrides(**variant),
            shifts=1,
            direction=direction,
            chunk_size=3,
            normalize=normalize,
        )


@pytest.mark.parametrize("normalize", [False, True])
def test_double_backward(device, variant, normalize):
    """Second-order gradients (a penalty on the gradients, ``create_graph=True``) through the triton
    kernels equal the reference backend's (which tests/ops/test_double_backward.py checks against the
    float64 oracle)."""
    from test_double_backward import _inputs, second_order

    inputs = [t.to(device) for t in _inputs((2, 2, 3, 4))]
    for direction in ("bt", "lr"):
        kwargs = {"direction": direction, "chunk_size": 2, "normalize": normalize}
        with triton_launch.launch_overrides(**variant):
            got = second_order(lambda *a, kw=kwargs: line_scan(*a, **kw, backend="triton"), inputs)
        want = second_order(lambda *a, kw=kwargs: line_scan(*a, **kw, backend="reference"), [t.cpu() for t in inputs])
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g.cpu(), w, **TOL[torch.float64])


def test_missing_triton_is_reported(monkeypatch):
    """Without triton the backend is unavailable with a reason, and nothing else breaks."""
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(sys.modules, "gspn.ops.line_scan.kernels", raising=False)
    monkeypatch.setattr(triton_surface, "_kernel_module", None)
    monkeypatch.setattr(triton_surface, "_import_error", None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not triton_surface.is_available("cpu")
    assert "triton is not installed" in triton_surface.unavailable_reason("cpu")
    assert "triton" not in available_backends("cpu")
    with pytest.raises(RuntimeError, match="not available"):
        x = torch.zeros(1, 1, 2, 2)
        line_scan(x, x, x, x, x, backend="triton")


# --- fallback: only when a variant cannot be built ----------------------------------------------


def _out_of_resources() -> Exception:
    from triton.runtime.errors import OutOfResources

    return OutOfResources(232448, 227 * 1024, "shared memory")


ILLEGAL_ACCESS = "CUDA error: an illegal memory access was encountered"


def test_cannot_build_is_precise():
    """Compile and resource errors mean "cannot build"; a CUDA fault, a bad argument or an interpreter
    error does not."""
    from triton.compiler.errors import CompilationError, CompileTimeAssertionFailure
    from triton.runtime import errors

    build = [
        CompilationError("src", None, "gather is not supported"),
        CompileTimeAssertionFailure("src", None, "static_assert"),
        _out_of_resources(),
        RuntimeError("PassManager::run failed"),
    ]
    if hasattr(errors, "PTXASError"):
        build.append(errors.PTXASError("ptxas fatal"))
    for exc in build:
        assert triton_launch.cannot_build(exc), exc
    for exc in (
        RuntimeError(ILLEGAL_ACCESS),
        RuntimeError("out of resource: shared memory"),
        ValueError("bad"),
        errors.InterpreterError("boom"),
        torch.cuda.OutOfMemoryError("oom"),
    ):
        assert not triton_launch.cannot_build(exc), exc


def test_run_variants_chain(monkeypatch):
    """register (pipelined, then one stage) → memory; the fallback is recorded and warned about once,
    and a fault propagates with nothing recorded."""
    monkeypatch.setattr(triton_launch, "broken_builds", set())
    cpu = torch.device("cpu")
    calls = []

    def launchers(register_error):
        def register(cfg):
            calls.append(("register", cfg["num_stages"]))
            error = register_error(cfg)
            if error is not None:
                raise error

        return {"register": register, "split": None, "memory": lambda cfg: calls.append(("memory", cfg["block_p"]))}

    geometry = (6, 40, 1, cpu, 80)  # lines of 40: BLOCK_P 64
    with triton_launch.launch_overrides(num_stages=3):
        only_pipelined = launchers(lambda cfg: _out_of_resources() if cfg["num_stages"] > 1 else None)
        assert triton_launch.run_variants(only_pipelined, *geometry)["kernel"] == "register"
    assert calls == [("register", 3), ("register", 1)] and triton_launch.broken_builds == {("pipelined", 64)}

    calls.clear()
    fault = launchers(lambda cfg: RuntimeError(ILLEGAL_ACCESS))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        triton_launch.run_variants(fault, *geometry)
    assert calls == [("register", 1)] and triton_launch.broken_builds == {("pipelined", 64)}

    calls.clear()
    never = launchers(lambda cfg: _out_of_resources())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert triton_launch.run_variants(never, *geometry)["kernel"] == "memory"
    assert [str(w.message).count("cannot be built") for w in caught] == [1], [str(w.message) for w in caught]
    assert caught[0].category is RuntimeWarning and "OutOfResources" in str(caught[0].message)
    assert calls == [("register", 1), ("memory", 64), ("memory", 64), ("memory", 64)]
    assert ("register", 64) in triton_launch.broken_builds
    with triton_launch.launch_overrides(kernel="register"):  # forcing a broken variant gives memory too
        assert triton_launch.launch_config(6, 40, 1, cpu, 80)["kernel"] == "memory"


class _FailingKernel:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` raises ``error``."""

    def __init__(self, error: Exception):
        self.error = error
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            raise self.error

        return launch


def _scan_with_gradients(x, params, overrides):
    with triton_launch.launch_overrides(**overrides):
        return _run(line_scan, x, params, backend="triton", direction="lr", chunk_size=3, normalize=True)


@pytest.mark.parametrize("variant", ["register", "split"])
def test_kernel_fault_propagates(monkeypatch, variant):
    """An illegal memory access raised by a register/split launch reaches the caller unchanged; no
    fallback is recorded and the next call uses the same variant."""
    monkeypatch.setattr(triton_launch, "broken_builds", set())
    kernels = triton_surface._load()
    fault = _FailingKernel(RuntimeError(ILLEGAL_ACCESS))
    monkeypatch.setattr(kernels, f"line_scan_fwd_{'reg' if variant == 'register' else 'split'}_kernel", fault)
    x, params = _make((1, 2, 5, 6), [(1, 2, 5, 6)] * 4, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        _scan_with_gradients(x, params, VARIANTS[variant])
    assert fault.launches == 1 and triton_launch.broken_builds == set()
    with triton_launch.launch_overrides(**VARIANTS[variant]):
        assert triton_launch.launch_config(2, 5, 2, torch.device("cpu"), 10)["kernel"] == variant


@pytest.mark.parametrize("variant", ["register", "split"])
def test_unbuildable_variant_falls_back_exactly(monkeypatch, variant):
    """A register/split kernel that runs out of resources (forward) or fails to compile (backward) is
    replaced by the memory variant: same bits as the memory variant run directly, one warning."""
    from triton.compiler.errors import CompilationError

    monkeypatch.setattr(triton_launch, "broken_builds", set())
    kernels = triton_surface._load()
    suffix = "reg" if variant == "register" else "split"
    failing = {
        "fwd": _FailingKernel(_out_of_resources()),
        "bwd": _FailingKernel(CompilationError("src", None, "tl.gather is not supported")),
    }
    for pass_, kernel in failing.items():
        monkeypatch.setattr(kernels, f"line_scan_{pass_}_{suffix}_kernel", kernel)
    x, params = _make((1, 2, 5, 6), [(1, 2, 5, 6)] * 4, torch.float32, "cpu")
    overrides = VARIANTS[variant]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _scan_with_gradients(x, params, overrides)
        again = _scan_with_gradients(x, params, overrides)
    messages = [str(w.message) for w in caught if "cannot be built" in str(w.message)]
    # The forward records (variant, BLOCK_P), so the backward and the second call pick memory directly.
    assert len(messages) == 1 and "OutOfResources" in messages[0], messages
    assert failing["fwd"].launches == 1 and failing["bwd"].launches == 0
    want = _scan_with_gradients(x, params, {**overrides, "kernel": "memory"})
    for a, b, c in zip(got, again, want, strict=True):
        assert torch.equal(a, c) and torch.equal(b, c)
    reference = _run(line_scan, x, params, backend="reference", direction="lr", chunk_size=3, normalize=True)
    _assert_close(got, reference, torch.float32)


def test_gpu_launch_choice(monkeypatch):
    """On a (pretend) 132-SM GPU: whole lines in registers when planes fill the GPU, lines split
    over programs when they do not or are longer than 1024; a broken split build uses memory."""
    monkeypatch.setattr(triton_launch, "broken_builds", set())
    props = type("Props", (), {"multi_processor_count": 132})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    cuda = torch.device("cuda")

    def pick(slices, length, chunks=1):
        return triton_launch.launch_config(slices, length, chunks, cuda, 2 * length)

    assert pick(8 * 1536, 56)["kernel"] == "register"
    assert pick(1280, 128)["kernel"] == "register"
    assert pick(128, 1024)["kernel"] == "register"
    assert pick(8, 1024, chunks=64)["kernel"] == "register"  # many independent tiles
    few = pick(8, 1024)
    assert (few["kernel"], few["block_p"], few["halo"], few["block_s"]) == ("split", 512, 32, 1)
    huge = pick(8, 16384)
    assert (huge["kernel"], huge["block_p"], huge["halo"], huge["num_warps"]) == ("split", 512, 32, 4)
    segment, segments, groups, blocks = triton_launch.split_programs(8, 16384, 16384, huge)
    assert (segment, segments, groups, blocks) == (448, 37, 8, 512)
    assert pick(4096, 2048)["kernel"] == "split"  # longer than a register block
    triton_launch.broken_builds.add(("split", 512))
    assert pick(8, 16384)["kernel"] == "memory"


def test_kernels_compile_for_sm90():
    """Ahead-of-time sm_90 build of two kernels with the ptxas in triton's wheel (no GPU needed)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("triton's wheel has no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "triton_compile_check.py"), "--quick"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAILED" not in proc.stdout and "SPILLS" not in proc.stdout, proc.stdout


def test_strided_and_expanded_inputs(device):
    """Planes reached through arbitrary batch/channel strides: a channel-sliced x, expanded gates."""
    big, params = _make((2, 6, 5, 6), [(1, 1, 5, 6)] * 4, torch.float32, device)
    x = big[:, ::2]  # channel stride 2·H·W
    expanded = [p.expand(2, 3, 5, 6) for p in params]  # batch and channel strides 0
    for direction in ("bt", "lr"):
        with triton_launch.launch_overrides(**SMALL):
            got = line_scan(x, *expanded, direction=direction, normalize=True, backend="triton")
        want = line_scan(
            x.cpu(), *(p.cpu() for p in expanded), direction=direction, normalize=True, backend="reference"
        )
        torch.testing.assert_close(got.cpu(), want, **TOL[torch.float32])


def test_benchmark_verification(device, monkeypatch):
    """The GPU benchmark's pre-timing check, run here through the interpreter on a tiny case."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "triton_line_scan.py"
    spec = importlib.util.spec_from_file_location("bench_triton_line_scan", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    x, params = _make((1, 2, 6, 9), [(1, 2, 6, 9)] * 4, torch.float32, device)
    kwargs = {"direction": "lr", "chunk_size": None, "normalize": True}
    impls = ["triton:split/8/2", "triton:register", "baseline"]
    for small in (True, False):
        lines = bench.verify_case(impls, x, params, kwargs, small=small)
        assert len(lines) == 2 and all(line.endswith("OK") for line in lines), lines
    bad = [p.clone() for p in params]
    want = bench.scan_results("reference", {}, x, params, kwargs, keep=6)
    got = bench.scan_results("reference", {}, x, [bad[0] * 2, *bad[1:]], kwargs, keep=6)
    assert max(bench.relative_errors(got, want)) > bench.VERIFY_TOLERANCE[torch.float32]


def test_fused_layer_operator(device):
    """``gspn_mix(backend="triton")``: the layer composition on the Triton scans, forward and all seven
    gradients against the reference backend."""
    from gspn.ops import gspn_mix

    gen = torch.Generator().manual_seed(0)
    shapes = [(2, 4, 5, 6), (2, 3, 5, 6), (4, 3, 2, 3), (4, 4, 3), (4, 4, 3), (4, 4, 3), (4,)]
    args = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    results = []
    for backend, dev in (("triton", device), ("reference", "cpu")):
        leaves = [a.to(dev).requires_grad_() for a in args]
        with triton_launch.launch_overrides(**SMALL):
            y = gspn_mix(*leaves, chunk_size=4, backend=backend)
            grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
        results.append([t.cpu() for t in (y, *grads)])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, **TOL[torch.float64])


def test_lines_of_one_pixel_give_exactly_zero_gate_gradients(device, variant):
    """A position without neighbours has the single weight 1 whatever its logit, so every gate
    gradient of a line of one pixel is exactly 0 (reference and cpu: test_nonfinite.py)."""
    gen = torch.Generator().manual_seed(9)
    for shape, directions in [((1, 2, 5, 1), ("tb", "bt")), ((1, 2, 1, 5), ("lr", "rl"))]:
        for direction in directions:
            tensors = [(5 * torch.randn(shape, generator=gen)).to(device).requires_grad_() for _ in range(5)]
            with triton_launch.launch_overrides(**variant):
                out = line_scan(*tensors, direction=direction, normalize=True, backend="triton")
                grads = torch.autograd.grad(out, tensors, torch.randn(shape, generator=gen).to(device))
            for k in range(3):
                assert grads[2 + k].eq(0).all(), (direction, k)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_forward_mode_tangent_matches_reference(device, direction):
    """torch.func.jvp through the triton backend equals the reference backend's (issue 21, kind 4)."""
    x, params = _make((2, 3, 7, 5), [(1, 3, 7, 5)] * 4, torch.float64, device)
    _, tangents = _make((2, 3, 7, 5), [(1, 3, 7, 5)] * 4, torch.float64, device, seed=3)
    primals, tans = (x, *params), (x.flip(-1), *tangents)

    def run(backend):
        def f(*args):
            return line_scan(*args, direction=direction, chunk_size=3, normalize=True, backend=backend)

        return torch.func.jvp(f, primals, tans)[1]

    with triton_launch.launch_overrides(**SMALL):
        got = run("triton")
    torch.testing.assert_close(got.cpu(), run("reference").cpu(), **TOL[torch.float64])
    assert got.abs().max() > 0.01
