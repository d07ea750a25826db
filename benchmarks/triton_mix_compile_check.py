"""Compile the fused ``gspn_mix`` Triton kernels for an NVIDIA GPU architecture without a GPU, and
report their resource use (registers, spilled stack bytes, shared memory per thread/block).

Usage::

    python benchmarks/triton_mix_compile_check.py              # sm_90 (H100/H200)
    python benchmarks/triton_mix_compile_check.py --arch 80    # A100

Like ``benchmarks/triton_compile_check.py`` (whose ``cuobjdump`` helper it uses), this builds ahead
of time with the ``ptxas`` in Triton's wheel: it proves the kernels *build* for the target and shows
whether they spill, nothing about speed or correctness on a GPU. The configurations are those
``gspn.ops.triton._mix`` picks on a GPU for lines of 64, 128, 256 and 1024 positions and ``S = 8``
(one ``S = 16`` case). Exits non-zero if a kernel fails to compile. Run it without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parent))

# (kernel, constexpr block sizes, num_warps, dtype of x / proxy / g / out)
CASES = [
    ("gspn_mix_fwd_reg_kernel", {"BLOCK_S": 16, "BLOCK_P": 64}, 8, "bf16"),
    ("gspn_mix_fwd_reg_kernel", {"BLOCK_S": 1, "BLOCK_P": 1024}, 8, "bf16"),
    ("gspn_mix_fwd_kernel", {"BLOCK_S": 2, "BLOCK_P": 1024}, 8, "bf16"),
    ("gspn_mix_bwd_reg_kernel", {"BLOCK_S": 4, "BLOCK_J": 8, "BLOCK_P": 64}, 4, "fp32"),
    ("gspn_mix_bwd_reg_kernel", {"BLOCK_S": 2, "BLOCK_J": 8, "BLOCK_P": 128}, 4, "fp32"),
    ("gspn_mix_bwd_reg_kernel", {"BLOCK_S": 1, "BLOCK_J": 8, "BLOCK_P": 256}, 4, "fp32"),
    ("gspn_mix_bwd_reg_kernel", {"BLOCK_S": 1, "BLOCK_J": 16, "BLOCK_P": 128}, 4, "fp32"),
    ("gspn_mix_bwd_reg_kernel", {"BLOCK_S": 1, "BLOCK_J": 8, "BLOCK_P": 1024}, 8, "fp32"),
]


def _signature(fn, consts: dict, dtype: str) -> tuple[dict, dict]:
    """Triton signature and divisibility attributes: image pointers in ``dtype``, scratch and
    accumulators float32, strides int64, sizes int32."""
    sig, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dtype}" if name in ("x_ptr", "z_ptr", "g_ptr", "out_ptr") else "*fp32"
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name.rsplit("_", 1)[-1] in ("sb", "sc", "sh", "sw", "sblk"):
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    return sig, attrs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (default 90)")
    args = parser.parse_args(argv)
    try:
        import triton
        import triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        print("triton_mix_compile_check.py: triton is not installed", file=sys.stderr)
        return 1
    from gspn.ops.triton import _mix
    from triton_compile_check import _resource_usage

    target = GPUTarget("cuda", args.arch, 32)
    print(f"triton {triton.__version__}, target sm_{args.arch}")
    failures = 0
    for name, blocks, num_warps, dtype in CASES:
        fn = getattr(_mix, name)
        for first in (True, False):
            consts = {"VERTICAL": False, "REVERSE": True, "FIRST": first, "ACC": tl.float32, **blocks}
            if "fwd" in name:
                consts["LAST"] = not first
            if name == "gspn_mix_fwd_reg_kernel":
                consts["STORE_H"] = False
            label = f"{name:24s} {blocks} warps={num_warps} first={int(first)}"
            sig, attrs = _signature(fn, consts, dtype)
            start = time.perf_counter()
            try:
                compiled = triton.compile(
                    ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                    target=target,
                    options={"num_warps": num_warps, "num_stages": 1},
                )
            except Exception as exc:
                failures += 1
                print(f"{label}  FAILED: {type(exc).__name__}: {str(exc)[:500]}")
                continue
            usage = _resource_usage(compiled.asm["cubin"])
            stack = int(usage.split("STACK:")[1].split()[0]) if "STACK:" in usage else -1
            print(
                f"{label}  {' '.join(usage.split()[:3])} {time.perf_counter() - start:5.1f}s"
                f"{'  SPILLS' if stack > 0 else ''}",
                flush=True,
            )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
