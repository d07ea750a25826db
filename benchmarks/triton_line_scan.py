"""GPU benchmark of the Triton line scan against the per-line baseline (the reference backend).

Usage::

    python benchmarks/triton_line_scan.py                 # the four issue shapes, bf16
    python benchmarks/triton_line_scan.py --quick         # fewer repetitions, one direction
    python benchmarks/triton_line_scan.py --shapes 16x8x1024x1024,8x1536x56x56 --dtype fp16

For every shape, direction, ``normalize`` setting and pass (forward, forward+backward) it prints
the median time (``triton.testing.do_bench``, which flushes the L2 cache before every repetition),
the achieved bandwidth under the byte model below, the fraction of the device's *measured* copy
bandwidth (``dst.copy_(src)`` on a 1 GiB buffer, timed the same way in the same run), and the
speed-up over the baseline. It ends with the cost of the fused normalisation (time with
``normalize=True`` over ``normalize=False``).

Byte model (the compulsory HBM traffic of a fully fused implementation; caches, the kernels'
float32 scratch lines and the float32 staging of the backward's gradients are *not* counted, so
the figure is an efficiency against the ideal, not a measurement of traffic):

* forward: read ``x, lam, w_left, w_mid, w_right``, write ``h`` — 6 tensors when the parameters
  are full size (each tensor counted at its own dtype and its own, possibly broadcast, size);
* backward: read ``grad, h, x, lam, w_left, w_mid, w_right``, write ``dx, dlam, dw_left, dw_mid,
  dw_right`` — 12 tensors;
* forward+backward: the sum, 18 tensors.

The baseline is the reference backend on the GPU: one set of small PyTorch kernels per line, like
the published GSPN-1 CUDA code's one launch per line. It is skipped for inputs above
``--baseline-max-numel`` elements (its float32 copies and per-line stacking need many times the
input's memory); out-of-memory errors are reported as ``OOM`` and the run goes on.

Before timing a case, every Triton variant is checked against a reference (``--no-verify`` skips
it): the baseline when the case is small enough for it (output and all five gradients), else the
Triton *memory* variant (output and dx) — on a GPU this is the only check of the split variant's
inter-program synchronisation, which the CPU interpreter cannot exercise. A line ending in
``MISMATCH`` means the timing of that variant is worthless.

Exits with a message and status 1 when there is no CUDA device or triton is not installed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_SHAPES = "16x8x1024x1024,1x1280x128x128,8x1536x56x56,1x8x16384x16384"
COPY_BYTES = 1 << 30


@dataclass
class Row:
    shape: tuple[int, int, int, int]
    direction: str
    normalize: bool
    mode: str  # "fwd" or "fwd+bwd"
    impl: str  # "triton" or "baseline"
    ms: float | None
    nbytes: int = 0  # byte model of this pass
    note: str = ""


def parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
    """``"16x8x1024x1024,1x1280x128x128"`` → list of ``(B, C, H, W)``."""
    shapes = []
    for item in text.split(","):
        dims = tuple(int(v) for v in item.lower().replace("(", "").replace(")", "").split("x"))
        if len(dims) != 4 or min(dims) < 1:
            raise argparse.ArgumentTypeError(f"a shape is BxCxHxW with positive sizes, got {item!r}")
        shapes.append(dims)
    return shapes


def model_bytes(x: torch.Tensor, params: list[torch.Tensor], out_dtype: torch.dtype, backward: bool) -> int:
    """Bytes of the byte model (module docstring) for one call: forward, or forward+backward."""
    size = x.numel() * x.element_size()
    psize = sum(p.numel() * p.element_size() for p in params)
    out = x.numel() * torch.empty((), dtype=out_dtype).element_size()
    fwd = size + psize + out
    if not backward:
        return fwd
    bwd = 2 * out + size + psize + size + psize  # read grad, h, x, params; write dx, dparams
    return fwd + bwd


def bench_ms(fn: Callable[[], object], rep: int, warmup: int, grad_to_none=None) -> float:
    """Median milliseconds of ``fn`` (one untimed call first, so compilation is excluded)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def copy_bandwidth(device: torch.device, rep: int, warmup: int) -> float:
    """Measured device copy bandwidth in bytes/s (read + write of a 1 GiB buffer)."""
    src = torch.empty(COPY_BYTES // 2, dtype=torch.bfloat16, device=device).uniform_()
    dst = torch.empty_like(src)
    samples = [bench_ms(lambda: dst.copy_(src), rep, warmup) for _ in range(3)]
    return 2 * COPY_BYTES / (statistics.median(samples) * 1e-3)


def time_pass(mode: str, backend: str, x, params, kwargs, rep: int, warmup: int) -> float:
    """Median ms of the forward (``mode="fwd"``) or forward+backward of ``line_scan``."""
    from gspn.ops import line_scan

    if mode == "fwd":

        def forward():
            with torch.no_grad():
                line_scan(x, *params, backend=backend, **kwargs)

        return bench_ms(forward, rep, warmup)
    leaves = [t.detach().requires_grad_() for t in (x, *params)]
    grad = torch.randn_like(x)

    def step():
        line_scan(*leaves, backend=backend, **kwargs).backward(grad)

    return bench_ms(step, rep, warmup, grad_to_none=leaves)


def launch_summary(shape, direction: str, chunk_size: int | None, dtype: torch.dtype, device) -> str:
    """One line: the kernel variant and launch configuration ``"auto"`` picks for this case."""
    from gspn.ops import _triton as triton_backend
    from gspn.ops.directions import get_direction

    batch, channels, height, width = shape
    vertical = get_direction(direction).vertical
    lines, length = (height, width) if vertical else (width, height)
    chunks = -(-lines // min(chunk_size or lines, lines))
    scratch = 0 if dtype in (torch.float32, torch.float64) else 2 * length
    parts = []
    for label, floats in (("fwd", scratch), ("bwd", 6 * length)):
        cfg = triton_backend.launch_config(batch * channels, length, chunks, device, floats)
        if cfg["kernel"] == "split":
            segment, segments, groups, blocks = triton_backend.split_programs(batch * channels, length, lines, cfg)
            programs = f"{segments * groups}x{blocks} (segment {segment}, halo {cfg['halo']})"
        else:
            programs = -(-batch * channels // cfg["block_s"]) * cfg["chunk_programs"]
        parts.append(
            f"{label}: {cfg['kernel']} BLOCK_S={cfg['block_s']} BLOCK_P={cfg['block_p']} "
            f"warps={cfg['num_warps']} programs={programs}"
        )
    label = "x".join(map(str, shape))
    return f"{label:>22} {direction:>3}  launch (auto) — " + "; ".join(parts)


def kernel_overrides(spec: str) -> dict[str, object]:
    """``"split/1024/64"`` → ``{"kernel": "split", "block_p": 1024, "halo": 64}``; ``"register"`` →
    ``{"kernel": "register"}`` (see ``gspn.ops._triton.launch_overrides``)."""
    name, *numbers = spec.split("/")
    overrides: dict[str, object] = {"kernel": name}
    for key, value in zip(("block_p", "halo"), numbers, strict=False):
        overrides[key] = int(value)
    return overrides


GRADIENT_NAMES = ("h", "dx", "dlam", "dw_left", "dw_mid", "dw_right")
# Largest |got - want| / max|want| accepted by the verification, per input dtype.
VERIFY_TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 4e-3, torch.float32: 1e-4}


def scan_results(backend: str, overrides: dict, x, params, kwargs, keep: int) -> list[torch.Tensor]:
    """``line_scan`` output and gradients (x, λ, three gates) for a fixed cotangent, one call of
    ``backend`` under ``launch_overrides(**overrides)``; only the first ``keep`` are kept."""
    from gspn.ops import _triton as triton_backend
    from gspn.ops import line_scan

    leaves = [t.detach().requires_grad_() for t in (x, *params)]
    gen = torch.Generator(device=x.device).manual_seed(1)
    with triton_backend.launch_overrides(**overrides):
        h = line_scan(*leaves, backend=backend, **kwargs)
        h.backward(torch.randn(h.shape, generator=gen, device=h.device, dtype=h.dtype))
    results = [h.detach(), *(leaf.grad for leaf in leaves)][:keep]
    del h, leaves
    return results


def relative_errors(got: list[torch.Tensor], want: list[torch.Tensor]) -> list[float]:
    """``max |got - want| / max |want|`` per tensor (compared in float32, chunk by chunk)."""
    errors = []
    for a, b in zip(got, want, strict=True):
        worst, scale = 0.0, 0.0
        for ca, cb in zip(a.flatten().split(1 << 26), b.flatten().split(1 << 26), strict=True):
            worst = max(worst, (ca.float() - cb.float()).abs().max().item())
            scale = max(scale, cb.float().abs().max().item())
        errors.append(worst / max(scale, 1e-30))
    return errors


def verify_case(impls: list[str], x, params, kwargs, small: bool) -> list[str]:
    """Check every Triton variant against a reference before timing it: the per-line baseline when
    the case is ``small`` (output and all five gradients), else the Triton *memory* variant (one
    program per plane, a different algorithm and synchronisation: output and dx only, to bound
    memory). Returns one report line per variant, ending in ``OK`` or ``MISMATCH``."""
    keep = len(GRADIENT_NAMES) if small else 2
    ref_label = "baseline" if small else "triton:memory"
    want = scan_results(
        "reference" if small else "triton", {} if small else {"kernel": "memory"}, x, params, kwargs, keep
    )
    tolerance = VERIFY_TOLERANCE.get(x.dtype, 1e-4)
    lines = []
    for impl in impls:
        if impl in ("baseline", ref_label):
            continue
        overrides = kernel_overrides(impl.split(":")[1]) if ":" in impl else {}
        try:
            errors = relative_errors(scan_results("triton", overrides, x, params, kwargs, keep), want)
        except Exception as exc:  # report and go on, as the timing does
            lines.append(f"verify {impl} vs {ref_label}: ERROR {type(exc).__name__}: {str(exc)[:200]}")
            continue
        verdict = "OK" if max(errors) <= tolerance else "MISMATCH"
        detail = " ".join(f"{n} {e:.1e}" for n, e in zip(GRADIENT_NAMES, errors, strict=False))
        lines.append(f"verify {impl} vs {ref_label} (max|diff|/max|ref|): {detail}  {verdict}")
    return lines


def run_case(shape, direction, normalize, dtype, chunk_size, args, device) -> list[Row]:
    from gspn.ops import _triton as triton_backend

    rows: list[Row] = []
    numel = 1
    for n in shape:
        numel *= n
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        params = [0.5 * torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(4)]
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        for mode in ("fwd", "fwd+bwd"):
            rows.append(Row(shape, direction, normalize, mode, "triton", None, note="OOM (inputs)"))
        return rows

    kwargs = {"direction": direction, "chunk_size": chunk_size, "normalize": normalize}
    impls = [f"triton:{k}" if k != "auto" else "triton" for k in args.kernels]
    if not args.no_baseline and numel <= args.baseline_max_numel:
        impls.append("baseline")
    if args.verify:
        try:
            for line in verify_case(impls, x, params, kwargs, small=numel <= args.baseline_max_numel):
                print(f"{'x'.join(map(str, shape)):>22} {direction:>3} {int(normalize):>4}   {line}")
        except torch.cuda.OutOfMemoryError:
            print(f"{'x'.join(map(str, shape)):>22} {direction:>3} {int(normalize):>4}   verify: OOM")
        torch.cuda.empty_cache()
    for impl in impls:
        backend = "reference" if impl == "baseline" else "triton"
        rep = args.rep if backend == "triton" else max(1, args.rep // 4)
        overrides = kernel_overrides(impl.split(":")[1]) if ":" in impl else {}
        for mode in ("fwd", "fwd+bwd"):
            try:
                with triton_backend.launch_overrides(**overrides):
                    ms = time_pass(mode, backend, x, params, kwargs, rep, args.warmup)
                nbytes = model_bytes(x, params, dtype, backward=mode == "fwd+bwd")
                rows.append(Row(shape, direction, normalize, mode, impl, ms, nbytes))
            except torch.cuda.OutOfMemoryError:
                rows.append(Row(shape, direction, normalize, mode, impl, None, note="OOM"))
            except Exception as exc:  # keep measuring the other cases; report this one
                rows.append(
                    Row(
                        shape,
                        direction,
                        normalize,
                        mode,
                        impl,
                        None,
                        note=f"ERROR {type(exc).__name__}: {str(exc)[:200]}",
                    )
                )
            torch.cuda.empty_cache()
    if "baseline" not in impls:
        for mode in ("fwd", "fwd+bwd"):
            note = "skipped (--no-baseline)" if args.no_baseline else "skipped (> --baseline-max-numel)"
            rows.append(Row(shape, direction, normalize, mode, "baseline", None, note=note))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes",
        type=parse_shapes,
        default=parse_shapes(DEFAULT_SHAPES),
        help=f"comma-separated BxCxHxW (default {DEFAULT_SHAPES})",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument(
        "--directions",
        default="tb,lr",
        help="comma-separated scan directions (default tb,lr: one vertical, one horizontal)",
    )
    parser.add_argument("--chunk-size", type=int, default=None, help="local GSPN tile size (default: global)")
    parser.add_argument("--quick", action="store_true", help="short timing, first direction only")
    parser.add_argument(
        "--kernels",
        default="auto",
        help="comma-separated Triton kernel variants to time: auto, register, memory, split "
        "or split/BLOCK_P/HALO, e.g. auto,register,split/512/32,split/1024/64 (default auto)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="do not time the per-line baseline")
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip checking each Triton variant against a reference before timing it",
    )
    parser.add_argument(
        "--baseline-max-numel",
        type=int,
        default=1 << 28,
        help="skip the baseline above this many input elements (default 2^28)",
    )
    parser.add_argument("--device", default="cuda", help="CUDA device (default cuda)")
    parser.add_argument("--rep", type=int, default=None, help="do_bench repetition time in ms")
    parser.add_argument("--warmup", type=int, default=None, help="do_bench warm-up time in ms")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print(
            "triton_line_scan.py: no CUDA device is available; this benchmark needs an NVIDIA/AMD GPU "
            "(the CPU interpreter path is exercised by tests/ops/test_triton.py instead).",
            file=sys.stderr,
        )
        return 1
    try:
        import triton
    except ImportError:
        print("triton_line_scan.py: triton is not installed (pip install 'gspn[triton]').", file=sys.stderr)
        return 1
    from gspn.ops.line_scan import triton as triton_backend

    device = torch.device(args.device)
    if not triton_backend.is_available(device):
        print(f"triton_line_scan.py: {triton_backend.unavailable_reason(device)}", file=sys.stderr)
        return 1
    args.rep = args.rep or (40 if args.quick else 200)
    args.warmup = args.warmup or (10 if args.quick else 50)
    directions = [d.strip() for d in args.directions.split(",") if d.strip()]
    args.kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    if args.quick:
        directions = directions[:1]
    dtype = DTYPES[args.dtype]

    props = torch.cuda.get_device_properties(device)
    print(
        f"device: {props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB); "
        f"torch {torch.__version__}, triton {triton.__version__}; dtype {args.dtype}; "
        f"chunk_size {args.chunk_size}"
    )
    copy_bw = copy_bandwidth(device, args.rep, args.warmup)
    torch.cuda.empty_cache()
    print(f"measured copy bandwidth (dst.copy_(src), 1 GiB, read+write): {copy_bw / 1e9:.0f} GB/s")
    print("byte model: fwd = 6 tensors (x, lam, 3 gates in; h out), fwd+bwd = 18 tensors (module docstring)")
    header = (
        f"{'shape':>22} {'dir':>3} {'norm':>4} {'pass':>7} {'impl':>14} {'ms':>10} {'GB/s':>8} "
        f"{'%copy':>6} {'speedup':>8}"
    )
    print(header)
    print("-" * len(header))

    all_rows: list[Row] = []
    for shape in args.shapes:
        for direction in directions:
            print(launch_summary(shape, direction, args.chunk_size, dtype, device))
            for normalize in (False, True):
                rows = run_case(shape, direction, normalize, dtype, args.chunk_size, args, device)
                all_rows.extend(rows)
                times = {(r.mode, r.impl): r.ms for r in rows}
                for r in rows:
                    label = "x".join(map(str, r.shape))
                    prefix = f"{label:>22} {direction:>3} {int(normalize):>4} {r.mode:>7} {r.impl:>14}"
                    if r.ms is None:
                        print(f"{prefix}   {r.note}")
                        continue
                    bw = r.nbytes / (r.ms * 1e-3)
                    base = times.get((r.mode, "baseline"))
                    speedup = f"{base / r.ms:7.1f}x" if r.impl != "baseline" and base else ""
                    print(f"{prefix} {r.ms:10.3f} {bw / 1e9:8.0f} {100 * bw / copy_bw:5.1f}% {speedup:>8}")

    print("\nfused normalisation overhead (triton, normalize=True vs False):")
    by_key = {(r.shape, r.direction, r.mode, r.impl, r.normalize): r.ms for r in all_rows if r.impl != "baseline"}
    for (shape, direction, mode, impl, normalize), ms in by_key.items():
        if normalize or ms is None:
            continue
        on = by_key.get((shape, direction, mode, impl, True))
        if on is not None:
            label = "x".join(map(str, shape))
            print(f"{label:>22} {direction:>3} {mode:>7} {impl:>16}: {100 * (on / ms - 1):+6.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
