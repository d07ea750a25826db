"""What a peft LoRA adapter on a GSPN layer costs (issue 21): fused with the adapter vs plain vs unfused.

``GSPN2d`` gets an adapted projection's matrix by calling the module on the proxy's basis vectors
(plus zero, for a constant term) and keeps the fused operator; the alternative that calls every
projection on the real maps is ``fused=False``. Forward + backward of ``y.square().sum()``, timed
round-robin (one call of each variant per round, so machine noise hits all alike), minimum over
``--repeats`` rounds, ratios from the same run.

    python benchmarks/adapters.py                     # 1 thread, LoRA r=4 on w/l/u projections
    python benchmarks/adapters.py --shapes 1,96,56,56 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from peft import LoraConfig, get_peft_model

from gspn.nn import GSPN2d

SHAPES = [(1, 96, 56, 56), (8, 144, 56, 56), (1, 32, 256, 256)]
TARGETS = ["w_conv_up", "l_conv_up", "u_conv_up"]


def variants(channels: int, rank: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    plain = GSPN2d(channels, d_state=8)
    out = {"plain (fused)": plain}
    for name, fused in (("LoRA fused", True), ("LoRA unfused", False)):
        config = LoraConfig(r=rank, target_modules=TARGETS, init_lora_weights=False)
        model = get_peft_model(copy.deepcopy(plain), config)
        model.base_model.model.fused = fused
        out[name] = model
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", help="B,C,H,W (default: three layer shapes)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    targets = ", ".join(TARGETS)
    print(f"forward+backward, {args.threads} thread(s), LoRA r={args.rank} on {targets}; min of {args.repeats}")
    for shape in shapes:
        models = variants(shape[1], args.rank)
        x = torch.randn(shape)
        times = {name: [] for name in models}
        for _ in range(args.repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(x).square().sum().backward()
                times[name].append(time.perf_counter() - start)
        best = {name: min(t) for name, t in times.items()}
        cells = "  ".join(f"{name} {t * 1e3:8.1f} ms" for name, t in best.items())
        print(
            f"{shape!s:>20}  {cells}  | LoRA fused vs unfused {best['LoRA unfused'] / best['LoRA fused']:.2f}x,"
            f" vs plain {best['LoRA fused'] / best['plain (fused)']:.2f}x"
        )


if __name__ == "__main__":
    main()
