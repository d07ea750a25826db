"""Compile the Triton kernels (the line scan's and the fused ``gspn_mix`` layer's) for an NVIDIA GPU
architecture without a GPU, and report their resource use.

Usage::

    python benchmarks/triton_compile_check.py              # sm_90 (H100/H200), line-scan kernels
    python benchmarks/triton_compile_check.py --arch 80    # A100
    python benchmarks/triton_compile_check.py --quick      # three builds (used by the test suite)
    python benchmarks/triton_compile_check.py --kernels mix   # the fused gspn_mix kernels (or: all)

Triton compiles ahead of time with the ``ptxas`` shipped in its wheel, so this runs on a machine
without a GPU or a CUDA driver. For each kernel variant and launch configuration the backend uses
(block sizes and warps of ``gspn.ops._triton.launch_config`` for the issue's shapes) it prints
registers per thread, stack (spilled) bytes per thread, shared memory, and whether the loop loads
were software-pipelined (``cp.async`` in the PTX). It exits non-zero if a kernel fails to compile.
It says nothing about speed: that needs ``benchmarks/triton_line_scan.py`` on a GPU. The
``gspn_mix`` cases are the configurations ``gspn.ops.gspn_mix.kernels`` picks on a GPU for lines of 64,
128, 256 and 1024 positions and ``S = 8`` (one ``S = 16`` case).

Run it without ``TRITON_INTERPRET`` (it unsets the variable before importing triton).
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

# (kernel, block_s, block_p, num_warps): the configurations launch_config picks on a GPU for
# lines of 56-64, 128 and 1024 positions (register variant), for lines shared by several programs
# (split variant: 16384-long lines use 1024-wide windows, 1024-long lines 512-wide ones) and for the
# memory variant (the fallback).
MAIN = [
    ("line_scan_fwd_split_kernel", 1, 1024, 8),
    ("line_scan_bwd_split_kernel", 1, 1024, 8),
    ("line_scan_fwd_split_kernel", 1, 512, 4),
    ("line_scan_bwd_split_kernel", 1, 512, 4),
    ("line_scan_fwd_reg_kernel", 16, 64, 8),
    ("line_scan_bwd_reg_kernel", 16, 64, 8),
    ("line_scan_fwd_reg_kernel", 1, 128, 4),
    ("line_scan_bwd_reg_kernel", 1, 128, 4),
    ("line_scan_fwd_reg_kernel", 1, 1024, 8),
    ("line_scan_bwd_reg_kernel", 1, 1024, 8),
    ("line_scan_fwd_kernel", 1, 1024, 4),
    ("line_scan_bwd_kernel", 1, 1024, 4),
]
QUICK = [
    ("line_scan_fwd_reg_kernel", 1, 128, 4),
    ("line_scan_bwd_kernel", 1, 128, 4),
    ("line_scan_fwd_split_kernel", 1, 256, 4),
]
# gspn_mix: (kernel, constexpr block sizes, num_warps, dtype of x / proxy / g / out)
MIX = [
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
    """Triton signature and divisibility attributes for a kernel of :mod:`gspn.ops.line_scan.kernels`."""
    sig, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = {"state_ptr": "*fp32", "sync_ptr": "*i32"}.get(name, f"*{dtype}")
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name.endswith(("_sb", "_sc")):
            sig[name] = "i64"
        else:
            sig[name] = "i32"
            if name in ("W", "H", "P"):
                attrs[(index,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _mix_signature(fn, consts: dict, dtype: str) -> tuple[dict, dict]:
    """The same for a kernel of :mod:`gspn.ops.gspn_mix.kernels`: image pointers in ``dtype``, scratch and
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


def _resource_usage(cubin: bytes) -> str:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        cmd = [str(tool), "--dump-resource-usage", f.name]
        out = subprocess.run(cmd, capture_output=True, text=True).stdout
    return next((line.strip() for line in out.splitlines() if "REG:" in line), "?")


def _build(fn, consts: dict, signature, dtype: str, num_warps: int, label: str, target) -> bool:
    """Compile one configuration and print its resource use; ``False`` if it does not build."""
    import triton
    from triton.compiler import ASTSource

    sig, attrs = signature(fn, consts, dtype)
    start = time.perf_counter()
    try:
        compiled = triton.compile(
            ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
            target=target,
            options={"num_warps": num_warps, "num_stages": 1},
        )
    except Exception as exc:  # any build failure is reported, counted and the next case runs
        print(f"{label}  FAILED: {type(exc).__name__}: {str(exc)[:500]}")
        return False
    usage = _resource_usage(compiled.asm["cubin"])
    stack = int(usage.split("STACK:")[1].split()[0]) if "STACK:" in usage else -1
    pipelined = "cp.async" in compiled.asm.get("ptx", "")
    print(
        f"{label}  {' '.join(usage.split()[:3])} pipelined={int(pipelined)} "
        f"{time.perf_counter() - start:5.1f}s{'  SPILLS' if stack > 0 else ''}",
        flush=True,
    )
    return True


def _scan_cases(cases, dtype: str, quick: bool, tl):
    kernels = importlib.import_module("gspn.ops.line_scan.kernels")
    for name, block_s, block_p, num_warps in cases:
        for vertical in (False,) if quick else (True, False):
            for normalize in (True,) if quick else (False, True):
                consts = {
                    "VERTICAL": vertical,
                    "REVERSE": False,
                    "NORMALIZE": normalize,
                    "ACC": tl.float32,
                    "BLOCK_S": block_s,
                    "BLOCK_P": block_p,
                }
                if "bwd" in name:
                    consts["ACCUMULATE_DX"] = True
                elif name == "line_scan_fwd_kernel":
                    consts["STATE_IN_OUT"] = False
                label = (
                    f"{name:26s} BLOCK_S={block_s:<3d} BLOCK_P={block_p:<5d} warps={num_warps:<2d} "
                    f"{'vertical  ' if vertical else 'horizontal'} normalize={int(normalize)}"
                )
                yield getattr(kernels, name), consts, _signature, dtype, num_warps, label


def _mix_cases(tl):
    mix = importlib.import_module("gspn.ops.gspn_mix.kernels")
    for name, blocks, num_warps, dtype in MIX:
        for first in (True, False):
            consts = {"VERTICAL": False, "REVERSE": True, "FIRST": first, "ACC": tl.float32, **blocks}
            if "fwd" in name:
                consts["LAST"] = not first
            if name == "gspn_mix_fwd_reg_kernel":
                consts["STORE_H"] = False
            label = f"{name:24s} {blocks} warps={num_warps} first={int(first)}"
            yield getattr(mix, name), consts, _mix_signature, dtype, num_warps, label


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (default 90)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="line-scan data pointers")
    parser.add_argument("--quick", action="store_true", help="three line-scan kernels, one configuration each")
    parser.add_argument("--kernels", default="scan", choices=["scan", "mix", "all"], help="which kernels to build")
    args = parser.parse_args(argv)

    try:
        import triton
        import triton.language as tl
        from triton.backends.compiler import GPUTarget
    except ImportError:
        print("triton_compile_check.py: triton is not installed", file=sys.stderr)
        return 1
    target = GPUTarget("cuda", args.arch, 32)
    print(f"triton {triton.__version__}, target sm_{args.arch}, line-scan data pointers *{args.dtype}")
    cases = []
    if args.kernels in ("scan", "all"):
        cases.append(_scan_cases(QUICK if args.quick else MAIN, args.dtype, args.quick, tl))
    if args.kernels in ("mix", "all"):
        cases.append(_mix_cases(tl))
    failures = sum(not _build(*case, target) for group in cases for case in group)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
