"""Cost of the fused gate normalisation in the CPU line scan (issue 11: < 25 % of an unnormalised scan).

For each shape, ``gspn.ops.line_scan_4d(x, lam, wl, wm, wr, backend="cpu")`` forward (under
``torch.inference_mode``) with ``normalize=True`` and with ``normalize=False`` are timed
round-robin, one call each per round, so machine noise hits both alike; the figure is the ratio of
the minima (and of the medians) over ``--repeats`` rounds. ``--kernel`` times the backend alone
(``gspn.ops.line_scan.cpu.scan`` of the four directions into preallocated outputs: no allocation, no Python
wrapper), which isolates the kernel's own normalisation cost.

    python benchmarks/normalize_cost.py                 # all shapes, 1 thread
    python benchmarks/normalize_cost.py --kernel        # the backend alone
    python benchmarks/normalize_cost.py --shapes 2,384,16,16 1,320,64,64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gspn.ops import DIRECTIONS, line_scan_4d
from gspn.ops.line_scan import cpu

SHAPES = [
    (1, 32, 256, 256),
    (1, 96, 128, 128),
    (8, 144, 56, 56),
    (1, 320, 64, 64),
    (160, 128, 4, 4),
    (64, 128, 8, 8),
    (2, 384, 16, 16),
]


def make_calls(shape, kernel: bool):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    params = [torch.randn(shape[0], 4, *shape[1:], generator=gen) for _ in range(4)]
    if not kernel:
        return {
            norm: (lambda norm=norm: line_scan_4d(x, *params, normalize=norm, backend="cpu")) for norm in (True, False)
        }
    per_dir = [[p[:, k].contiguous() for p in params] for k in range(4)]
    out = torch.empty(shape)

    def call(norm):
        for k, direction in enumerate(DIRECTIONS):
            cpu.scan(x, *per_dir[k], direction=direction, chunk_size=None, normalize=norm, out=out)

    return {norm: (lambda norm=norm: call(norm)) for norm in (True, False)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--kernel", action="store_true", help="the backend alone, preallocated outputs")
    parser.add_argument("--shapes", nargs="+", default=None, help="B,C,H,W ...")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {'kernel' if args.kernel else 'line_scan_4d'}, "
        f"{args.repeats} rounds; ms"
    )
    for shape in shapes:
        calls = make_calls(shape, args.kernel)
        times = {norm: [] for norm in calls}
        with torch.inference_mode():
            for call in calls.values():
                call()
            for _ in range(args.repeats):
                for norm, call in calls.items():
                    start = time.perf_counter()
                    call()
                    times[norm].append((time.perf_counter() - start) * 1e3)
        lo = {k: min(v) for k, v in times.items()}
        med = {k: statistics.median(v) for k, v in times.items()}
        print(
            f"{shape!s:20s} normalised {lo[True]:8.2f}  unnormalised {lo[False]:8.2f}  "
            f"cost min {100 * (lo[True] / lo[False] - 1):+5.0f}%  median {100 * (med[True] / med[False] - 1):+5.0f}%",
            flush=True,
        )


if __name__ == "__main__":
    main()
