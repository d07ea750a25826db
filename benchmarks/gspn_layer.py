"""The GSPN layer, fused against unfused, against linear attention and SDPA of the same width.

Side by side in one run, for every shape and thread count: forward (under ``torch.inference_mode``)
and forward+backward (gradients of the input and all parameters) time, and the peak extra memory
of one call (torch.profiler: everything allocated through torch during the call, the output and the
fused backward's recomputation scratch included). The methods of one row are timed round-robin,
one call each per round, so machine noise hits them alike; ratios are taken within the run.

    python benchmarks/gspn_layer.py                  # the issue's four shapes, 1 and 2 threads
    python benchmarks/gspn_layer.py --quick          # smaller shapes, a sanity run
    python benchmarks/gspn_layer.py --json out.json  # also write every measurement
    python benchmarks/gspn_layer.py --operator       # line_scan_4d: normalisation cost, vs the reference loop
    python benchmarks/gspn_layer.py --threads 1 --shapes 1,96,128,128 1,320,64,64   # only these shapes

``--operator`` times the scan operator alone (``gspn.ops.line_scan_4d`` on the CPU backend, with and
without the fused normalisation, and the reference loop with it) at the small maps of the deep
classifier stages and the DiT grids, ``(160, 128, 4, 4)``, ``(64, 128, 8, 8)``, ``(2, 384, 16, 16)``,
and at the layer shapes above (the reference loop only where it takes under a few seconds).

Methods (width ``C``; attention heads: 2 at C = 32 as in the issue's measurement, 3 at 96 and 144
(Swin-T stage 1 / GSPN-T stage 1), 5 at 320 (Stable Diffusion's first stage), otherwise C / 32):

* ``unfused`` — ``GSPN2d(C, d_state=8, fused=False)``: four 1×1 up-projections materialise
  ``(B, 4·3·C + 3·4·C, H, W)`` parameters, then ``line_scan_4d``, gating and merge.
* ``fused`` — ``GSPN2d(C, d_state=8)``: ``x_conv_down`` then the fused :func:`gspn.ops.gspn_mix`.
* ``fused-cl`` — the same on a channels-last input (what :class:`gspn.nn.GSPNMixer` passes).
* ``compact`` — ``GSPN2d(C, d_state=8, propagation_channels=C // 8)``: GSPN-2 / C-GSPN compact
  channel propagation (1×1 to ``C/8`` proxy channels, one shared gate set, fused operator, 1×1 back).
* ``linear-attn`` — :class:`gspn.nn.LinearAttention` (q/k/v/out projections, ``elu + 1``).
* ``sdpa`` — :class:`gspn.recipes.bench.SelfAttention` (the same projections, SDPA pinned to its flash
  backend, which has a CPU kernel and O(N) memory); skipped above ``--sdpa-max-tokens`` tokens
  (default 16384), where one O(N²) call takes minutes on a CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from gspn.nn import GSPN2d
from gspn.recipes.bench.methods import LinearAttention, SelfAttention, Workload
from gspn.recipes.bench.timing import cpu_peak_bytes, make_step

SHAPES = [(1, 32, 256, 256), (1, 96, 128, 128), (8, 144, 56, 56), (1, 320, 64, 64)]
QUICK_SHAPES = [(1, 32, 64, 64), (2, 96, 32, 32)]
METHODS = ("unfused", "fused", "fused-cl", "compact", "linear-attn", "sdpa")
COMPACT_RATIO = 8  # compact: propagation_channels = C // COMPACT_RATIO
OPERATOR_SHAPES = [(160, 128, 4, 4), (64, 128, 8, 8), (2, 384, 16, 16), *SHAPES]


HEADS = {32: 2, 96: 3, 144: 3, 320: 5}


def _heads(channels: int) -> int:
    return HEADS.get(channels, max(1, channels // 32))


def build(method: str, shape: tuple[int, int, int, int], backward: bool) -> Workload:
    channels = shape[1]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    if method in ("unfused", "fused", "fused-cl"):
        module = GSPN2d(channels, d_state=8, fused=method != "unfused")
        if method == "fused-cl":
            x = x.contiguous(memory_format=torch.channels_last)
    elif method == "compact":
        module = GSPN2d(channels, d_state=8, propagation_channels=max(1, channels // COMPACT_RATIO))
    elif method == "linear-attn":
        module = LinearAttention(channels, _heads(channels))
    else:
        from torch.nn.attention import SDPBackend

        module = SelfAttention(channels, _heads(channels), backend=SDPBackend.FLASH_ATTENTION)
    if method in ("linear-attn", "sdpa"):
        x = x.flatten(2).transpose(1, 2).contiguous()  # (B, N, C) tokens
    module.train(backward)
    return Workload(module, (x.requires_grad_(backward),))


def run(shapes, threads_list, repeats: int, sdpa_max_tokens: int) -> list[dict]:
    """Every method of a (threads, shape, fwd / fwd+bwd) row is timed round-robin, one call each per
    round, so machine noise hits them alike; the time is the median over ``repeats`` rounds."""
    records = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        for shape in shapes:
            x_bytes = torch.Size(shape).numel() * 4
            for backward in (False, True):
                methods = [m for m in METHODS if m != "sdpa" or shape[2] * shape[3] <= sdpa_max_tokens]
                steps = {m: make_step(build(m, shape, backward), backward) for m in methods}
                for step in steps.values():
                    step()  # warm-up
                times: dict[str, list[float]] = {m: [] for m in methods}
                for _ in range(repeats):
                    for m, step in steps.items():
                        start = time.perf_counter()
                        step()
                        times[m].append((time.perf_counter() - start) * 1e3)
                row: dict[str, dict | None] = dict.fromkeys(METHODS)
                for m in methods:
                    record = {
                        "threads": threads,
                        "shape": list(shape),
                        "backward": backward,
                        "method": m,
                        "median_ms": statistics.median(times[m]),
                        "min_ms": min(times[m]),
                        "times_ms": times[m],
                        "peak_mem_bytes": cpu_peak_bytes(steps[m]) if m != "sdpa" else None,
                        "x_bytes": x_bytes,
                    }
                    records.append(record)
                    row[m] = record
                del steps
                _print_row(threads, shape, backward, row, x_bytes)
    return records


def run_operator(shapes, threads_list, repeats: int) -> list[dict]:
    """``line_scan_4d`` forward: CPU backend with and without normalisation, and the reference loop
    (normalised; only for maps of at most 64² pixels), round-robin as above."""
    from gspn.ops import line_scan_4d

    records = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        for shape in shapes:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(shape, generator=gen)
            params = [torch.randn(shape[0], 4, *shape[1:], generator=gen) for _ in range(4)]
            calls = {
                "cpu": lambda x=x, params=params: line_scan_4d(x, *params, normalize=True, backend="cpu"),
                "cpu-unnormalised": lambda x=x, params=params: line_scan_4d(x, *params, normalize=False, backend="cpu"),
            }
            if shape[2] * shape[3] <= 64 * 64:
                calls["reference"] = lambda x=x, params=params: line_scan_4d(
                    x, *params, normalize=True, backend="reference"
                )
            times: dict[str, list[float]] = {name: [] for name in calls}
            with torch.inference_mode():
                for call in calls.values():
                    call()
                for _ in range(repeats):
                    for name, call in calls.items():
                        start = time.perf_counter()
                        call()
                        times[name].append((time.perf_counter() - start) * 1e3)
            med = {name: statistics.median(t) for name, t in times.items()}
            record = {"threads": threads, "shape": list(shape), "median_ms": med, "times_ms": times}
            records.append(record)
            overhead = med["cpu"] / med["cpu-unnormalised"] - 1
            ref = (
                f" | reference {med['reference']:8.1f} -> cpu {med['reference'] / med['cpu']:5.2f}x faster"
                if ("reference" in med)
                else ""
            )
            print(
                f"threads={threads} line_scan_4d {tuple(shape)} ms: cpu {med['cpu']:7.2f}  unnormalised "
                f"{med['cpu-unnormalised']:7.2f}  normalisation +{overhead * 100:4.0f}%{ref}",
                flush=True,
            )
    return records


def _print_row(threads, shape, backward, row, x_bytes) -> None:
    kind = "fwd+bwd" if backward else "fwd"
    times = "  ".join(f"{m} {row[m]['median_ms']:8.1f}" if row[m] else f"{m} skipped" for m in METHODS)
    mem = "  ".join(
        f"{m} {row[m]['peak_mem_bytes'] / x_bytes:5.2f}x" if row[m]["peak_mem_bytes"] is not None else f"{m} -"
        for m in ("unfused", "fused", "fused-cl")
    )
    speedup = row["unfused"]["median_ms"] / row["fused"]["median_ms"]
    vs_linear = row["fused"]["median_ms"] / row["linear-attn"]["median_ms"]
    vs_linear_cl = row["fused-cl"]["median_ms"] / row["linear-attn"]["median_ms"]
    compact = row["compact"]["median_ms"]
    print(f"threads={threads} {tuple(shape)} {kind:7s} ms: {times}", flush=True)
    print(
        f"    fused speed-up over unfused {speedup:5.2f}x | fused / linear-attn {vs_linear:4.2f} "
        f"(channels-last input {vs_linear_cl:4.2f}) | peak extra memory / size of x: {mem}",
        flush=True,
    )
    print(
        f"    compact (C/{COMPACT_RATIO}): speed-up over fused {row['fused']['median_ms'] / compact:5.2f}x | "
        f"compact / linear-attn {compact / row['linear-attn']['median_ms']:4.2f}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, one thread")
    parser.add_argument("--operator", action="store_true", help="time line_scan_4d instead of the layers")
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts (default: 1 2)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sdpa-max-tokens", type=int, default=16384, help="skip SDPA above this many tokens")
    parser.add_argument("--json", default=None, help="write every measurement to this file")
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=None,
        metavar="B,C,H,W",
        help="only these shapes (layers and --operator), e.g. 1,96,128,128 1,320,64,64",
    )
    args = parser.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes]
    threads = args.threads or ([1] if args.quick else [1, 2])
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, times are medians in ms")
    if args.operator:
        operator_shapes = shapes if args.shapes else OPERATOR_SHAPES[:2] if args.quick else OPERATOR_SHAPES
        records = run_operator(operator_shapes, threads, args.repeats)
    else:
        records = run(shapes, threads, args.repeats, args.sdpa_max_tokens)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
