"""CPU benchmark of the line scan: reference loop vs the C++/OpenMP backend vs the copy bandwidth.

Prints, in one run and for each shape, direction (and the four-direction call) and pass
(forward, forward+backward): the time of the reference backend and of the ``cpu`` backend, the
speed-up, the ``cpu`` backend's effective bandwidth under the byte model below, and that bandwidth
as a fraction of this machine's copy bandwidth measured in the same run.

Byte model (float32, ``N = B·C·H·W``):

* forward, one direction: 6 tensors × N × 4 B (reads x, lam, w_left, w_mid, w_right; writes h);
* backward, one direction: 12 tensors × N × 4 B (reads grad, h, x, lam, 3 gates; writes 5 grads),
  so forward+backward counts 18;
* ``line_scan_4d``: 4× the one-direction figures (x is read once per direction).

Copy bandwidth: ``dst.copy_(src)`` on a 256 MiB buffer, counted as 2 × bytes (read + write), from an
ordinary tensor into a buffer advised to transparent huge pages — the way the scan moves data (its
inputs are ordinary tensors, its outputs are huge-page advised). Copies between two ordinary and two
huge-page buffers are printed for context: on the CI VM they differ by almost 2× (TLB misses).

The ``cpu`` column is what a user calls (``line_scan``: output allocation included, and a fresh
multi-MB buffer costs page faults on first touch); the ``kernel`` column is the backend alone
writing into a preallocated output (forward only), the number comparable to ``dst.copy_(src)``.

Targets (issue 2): forward ≥ 40% of copy bandwidth for "tb"/"bt", ≥ 20% for "lr"/"rl", and the
``cpu`` backend ≥ 5× the reference loop.

    python benchmarks/cpu_line_scan.py            # both shapes (about 2–3 minutes on 2 cores)
    python benchmarks/cpu_line_scan.py --quick    # the small shape only, fewer repetitions
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

from gspn.ops import DIRECTIONS, line_scan, line_scan_4d
from gspn.ops.line_scan import cpu

SHAPES = [(8, 384, 56, 56), (1, 256, 512, 512)]
TARGETS = {"tb": 0.40, "bt": 0.40, "lr": 0.20, "rl": 0.20}
TENSORS = {"fwd": 6, "fwd+bwd": 18}


def timeit(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, float]:
    """(min, median) wall time in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 10, huge_src: bool = False, huge_dst: bool = True) -> float:
    """Best ``dst.copy_(src)`` bandwidth, counted as read + write; optionally on huge-page buffers."""
    cpu_device = torch.device("cpu")
    src = (cpu.allocate((nbytes // 4,), torch.float32, cpu_device) if huge_src else torch.empty(nbytes // 4)).uniform_()
    dst = cpu.allocate(src.shape, src.dtype, cpu_device) if huge_dst else torch.empty_like(src)
    best, _ = timeit(lambda: dst.copy_(src), repeats, warmup=2)
    return 2 * nbytes / best


def make_call(shape, direction: str, backend: str, mode: str, normalize: bool):
    gen = torch.Generator().manual_seed(0)
    batch, channels, height, width = shape
    four = direction == "4d"
    pshape = (batch, 4, channels, height, width) if four else shape
    grad = mode == "fwd+bwd"
    x = torch.randn(shape, generator=gen).requires_grad_(grad)
    lam = torch.randn(pshape, generator=gen).requires_grad_(grad)
    gates = [(torch.rand(pshape, generator=gen) * 0.3).requires_grad_(grad) for _ in range(3)]
    inputs = (x, lam, *gates)

    def forward():
        if four:
            return line_scan_4d(*inputs, normalize=normalize, backend=backend)
        return line_scan(*inputs, direction=direction, normalize=normalize, backend=backend)

    if not grad:
        return lambda: forward()
    upstream = torch.randn((batch, 4, *shape[1:]) if four else shape, generator=gen)
    return lambda: torch.autograd.grad(forward(), inputs, upstream)


def make_kernel_call(shape, direction: str, normalize: bool):
    """The CPU backend alone, one direction, into a preallocated output."""
    gen = torch.Generator().manual_seed(0)
    x, lam = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    gates = [torch.rand(shape, generator=gen) * 0.3 for _ in range(3)]
    out = torch.empty(shape)
    return lambda: cpu.scan(x, lam, *gates, direction=direction, chunk_size=None, normalize=normalize, out=out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shape only, fewer repetitions")
    parser.add_argument("--normalize", action="store_true", help="fused gate normalisation (raw logits)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    shapes = SHAPES[:1] if args.quick else SHAPES
    # The reference copy moves memory like the scan does: from ordinary tensors (the inputs) into a
    # fresh output advised to huge pages. The other two layouts are printed for context.
    bandwidth = copy_bandwidth(huge_src=False, huge_dst=True)
    plain, huge = copy_bandwidth(huge_src=False, huge_dst=False), copy_bandwidth(huge_src=True, huge_dst=True)
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, normalize={args.normalize}"
    )
    print(
        f"# copy bandwidth: {bandwidth / 1e9:.1f} GB/s (256 MiB dst.copy_(src), read+write, ordinary src -> "
        f"huge-page dst, as the scan moves data); for context: ordinary -> ordinary {plain / 1e9:.1f} GB/s, "
        f"huge -> huge {huge / 1e9:.1f} GB/s"
    )

    header = (
        f"{'shape':>18} {'dir':>3} {'pass':>8} {'reference':>10} {'cpu':>9} {'speedup':>8} "
        f"{'cpu GB/s':>9} {'% copy':>7} {'target':>7} {'kernel':>9} {'% copy':>7}"
    )
    print(header)
    print("-" * len(header))
    results = []
    for shape in shapes:
        numel = torch.Size(shape).numel()
        large = numel > 10_000_000
        for direction in (*DIRECTIONS, "4d"):
            for mode in ("fwd", "fwd+bwd"):
                ref_reps = 1 if (args.quick or large) else 3
                cpu_reps = 3 if args.quick else 10
                ref, _ = timeit(make_call(shape, direction, "reference", mode, args.normalize), ref_reps)
                cpu, cpu_median = timeit(make_call(shape, direction, "cpu", mode, args.normalize), cpu_reps)
                nbytes = TENSORS[mode] * numel * 4 * (4 if direction == "4d" else 1)
                gbps = nbytes / cpu
                target = TARGETS.get(direction)
                row = dict(
                    shape=list(shape),
                    direction=direction,
                    mode=mode,
                    reference_s=ref,
                    cpu_s=cpu,
                    cpu_median_s=cpu_median,
                    speedup=ref / cpu,
                    cpu_bytes_per_s=gbps,
                    fraction_of_copy=gbps / bandwidth,
                    target=target if mode == "fwd" else None,
                )
                results.append(row)
                mark = kernel_cols = ""
                if mode == "fwd" and target is not None:
                    mark = f"{target:.0%} " + ("ok" if gbps / bandwidth >= target else "MISS")
                    kernel, _ = timeit(make_kernel_call(shape, direction, args.normalize), cpu_reps)
                    row.update(kernel_s=kernel, kernel_fraction_of_copy=nbytes / kernel / bandwidth)
                    kernel_cols = f"{kernel * 1e3:7.1f}ms {nbytes / kernel / bandwidth:7.0%}"
                print(
                    f"{'x'.join(map(str, shape)):>18} {direction:>3} {mode:>8} {ref * 1e3:8.1f}ms "
                    f"{cpu * 1e3:7.1f}ms {ref / cpu:7.1f}x {gbps / 1e9:9.1f} {gbps / bandwidth:7.0%} {mark:>7} "
                    f"{kernel_cols}",
                    flush=True,
                )
    slowest = min(r["speedup"] for r in results)
    print(f"# smallest speed-up over the reference loop: {slowest:.1f}x (target 5x)")
    if args.json:
        summary = dict(copy_bandwidth=bandwidth, copy_plain=plain, copy_huge=huge, threads=torch.get_num_threads())
        with open(args.json, "w") as f:
            json.dump(dict(summary, results=results), f, indent=1)


if __name__ == "__main__":
    main()
