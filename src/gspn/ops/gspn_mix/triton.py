"""Triton backend of the fused GSPN layer :func:`gspn.ops.gspn_mix` (kernels in :mod:`.kernels`,
imported lazily with triton; launch policy shared with the line scan in :mod:`gspn.ops._triton`).

Forward (``mix_forward``): the fusion of the CPU kernel on a GPU. For direction ``k`` and pixel
``p`` with proxy column ``z = proxy[b, :, p]`` (``S`` values)::

    a_k = gate_weight[k] @ z (3 logits per gate channel),  λ_k = lam_weight[k] @ z,  u_k = u_weight[k] @ z
    w_k = stabilize(a_k)   (masked softmax of log-sigmoids: the stability–context condition)
    h_k[l, p] = λ_k x[l, p] + w_left h_k[l-1, p-1] + w_mid h_k[l-1, p] + w_right h_k[l-1, p+1]
    y = Σ_k m_k (u_k ⊙ h_k + D_k ⊙ x) = (Σ_k m_k D_k) ⊙ x + Σ_k (m_k u_k) ⊙ h_k

(``h_k[l-1] = 0`` where line ``l`` starts a tile of ``chunk_size`` lines; ``m = merge_weight``.)

* **Launches.** Four, one per direction in :data:`gspn.ops.DIRECTIONS` order; each accumulates its
  term into ``y``. The first also adds the merged skip ``(Σ_k m_k D_k) ⊙ x`` (one weight matrix
  ``Σ_k m_k skip_weight[k]``, packed on the host), the last writes the result in the output dtype.
  Between launches ``y`` lives in an accumulation buffer (the output itself for float32/float64
  outputs, else one float32 ``(B, C, H, W)`` buffer).
* **What a program owns.** Grid ``(cdiv(B·C, BLOCK_S), tile_programs)``: program ``(i, j)`` owns
  the ``BLOCK_S`` slices ``s = b·C + c`` of group ``i`` and the tiles ``j, j + tile_programs, …`` of
  the scan axis, and walks each tile's lines in scan order. For each line it generates the line's
  gate logits, λ and ``m_k u_k`` (and, in the first launch, the merged ``D``) from the proxy line in
  registers with a loop over ``S`` (weights packed as ``(4, C, 6, S)``, the gates expanded from
  ``Cg`` to ``C``: ``4·6·C·S`` values), normalises the gates, advances the state and
  read-modify-writes its own elements of ``y``. No two programs touch the same element of ``y`` or
  of the scratch, so there is no cross-program communication.
* **Two variants.** *register* (the whole line, ``P <= BLOCK_P``, in one ``[BLOCK_S, BLOCK_P]``
  block; the state stays in registers and the ``p ± 1`` neighbours come from one ``tl.gather``) and
  *memory* (lines of any length in blocks of ``BLOCK_P`` positions; the state of the line before
  goes through a float scratch ping-pong ``(tile_programs, B·C, 2, P)``, with a block barrier
  ``tl.debug_barrier()`` after every line). On a GPU a register build that fails falls back to the
  memory variant.
* **Memory.** ``y`` (plus the float32 accumulator for half outputs), the packed weights and the
  memory variant's scratch (two lines per slice and tile program). No ``(B, 4, C, H, W)`` or
  ``(B, 12·Cg, H, W)`` tensor, and no per-pixel parameter map, is ever materialised.
* **Layouts and dtypes.** Every image tensor is addressed through its four strides (NCHW,
  channels-last, transposed or expanded views are read in place; ``y`` is written channels-last).
  ``x`` and ``proxy`` are read in their own dtype (float32/float64/bfloat16/float16); the state and
  all arithmetic are float32 (float64 for float64 inputs).

Backward (``mix_backward``): **fused**, two launches per direction (eight in all), nothing stored
by the forward but its inputs:

1. the register forward kernel with ``STORE_H`` recomputes the direction's hidden map ``h_k`` into
   one ``(B, C, H, W)`` buffer (reused by the four directions);
2. the adjoint kernel (``gspn_mix_bwd_reg_kernel``) walks each tile's lines in reverse scan order.
   A program owns ``BLOCK_S`` channels of one batch element and the tiles ``j, j + tile_programs,
   …``; it loads its weight rows once, regenerates each line's parameters from the proxy line,
   carries the adjoint ``q_k = w_k a`` of the line after in registers, accumulates ``dx``
   (read-modify-write of its own elements; the first launch adds the merged skip ``D ⊙ g``), and
   reduces the per-pixel gradients of the gate logits, λ, ``m_k u_k`` and ``D`` on the spot: into
   weight partials held in registers (``Σ_p dP z``, written once per program to
   ``(tile_programs, B, C, 6, S)``) and into the proxy gradient of the line (``Σ_c Σ_kind W dP``,
   added to a ``(channel groups, B, S, H, W)`` partial buffer that the host sums). The 1×1
   products are ``[BLOCK_S, BLOCK_J, BLOCK_P]`` broadcasts (``BLOCK_J = next_pow2(S)``).

Extra memory: ``h_k`` and ``dx`` (two maps of ``x``'s size, in the accumulation dtype), the proxy
partials (one proxy-sized buffer per channel group: one in the interpreter, ``C / BLOCK_S`` on a
GPU) and the small weight partials — no per-pixel parameter map, no four hidden maps. The gradient
of ``merge_weight`` follows from the packed weights' gradients (``Σ u_weight[k] ⊙ dW_u'``, and
likewise for the skip).

Fallback: when a direction's lines do not fit one register block (``P`` > 1024 on a GPU, > 256 in
the interpreter), when ``gspn.ops._triton.launch_overrides(kernel="memory")`` is set, or on a GPU where the register
kernels cannot be built, the backward recomputes per direction through the line-scan kernels
instead: that direction's λ, gate logits and u are materialised from the proxy (``einsum``), ``h_k``
by the Triton scan kernel, then the Triton adjoint scan; about 11 ``x``-sized maps at a time, still
one direction at a time (O(x), not O(4·x)).

Verified only under the Triton interpreter (``TRITON_INTERPRET=1``, ``tests/ops/test_triton_mix.py``),
never on a GPU: barriers, launch sizes and speed are unverified there. Ahead-of-time sm_90 builds
(``benchmarks/triton_compile_check.py --kernels mix``) succeed; the backward does not spill registers at the
sizes picked for lines up to 256 positions with ``S <= 8``, spills 8–32 bytes at ``S = 16`` and
~350 bytes for lines of 1024 positions (``[1, 8, 1024]`` products).
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType
from typing import Any

import torch

from .._library import image_like
from .._triton import (
    GPU_MAX_BLOCK_P,
    GPU_MAX_REG_BLOCK_P,
    GPU_MAX_TILE,
    INTERP_MAX_BLOCK_P,
    INTERP_MAX_TILE,
    MAX_SCRATCH_BYTES,
    acc_dtype,
    broken_builds,
    cannot_build,
    cdiv,
    next_pow2,
    overrides,
)
from ..directions import DIRECTIONS, get_direction
from ..line_scan import triton as scan_backend

__all__ = ["NATIVE_DTYPES", "backward", "forward", "is_available", "mix_backward", "mix_forward", "unavailable_reason"]

NATIVE_DTYPES = True
"""The forward kernels read x and proxy in their own dtype (the backward runs in the compute dtype)."""

# Elements of the backward's [BLOCK_S, BLOCK_J, BLOCK_P] products: ahead-of-time sm_90 builds spill
# at 8192 ([16, 8, 64], 8 warps: 456-568 stack bytes), not at 2048 ([4, 8, 64] and [2, 8, 128], 4 warps).
_GPU_MAX_PRODUCT = 2048
# Key of this module's register kernels in the shared record of builds that failed.
_REGISTER = "mix_register"
_kernel_module: ModuleType | None = None


def unavailable_reason(device: torch.device | str) -> str:
    """``""`` where the line-scan Triton backend runs (the backward's fallback uses its kernels) and
    this operator's kernels import; else why not (imports triton on first call)."""
    reason = scan_backend.unavailable_reason(device)
    if reason:
        return reason
    try:
        _kernels()
    except ImportError as exc:
        return f"triton is not installed ({exc}); pip install 'gspn[triton]'"
    return ""


def is_available(device: torch.device | str) -> bool:
    """True where :func:`unavailable_reason` is ``""``."""
    return unavailable_reason(device) == ""


def _kernels() -> ModuleType:
    """The kernel module :mod:`.kernels`, imported on first use (only once the device checks passed:
    ``TRITON_INTERPRET`` is read when a kernel is defined)."""
    global _kernel_module
    if _kernel_module is None:
        _kernel_module = importlib.import_module(f"{__package__}.kernels")
    return _kernel_module


def forward(x, proxy, weights, chunk_size) -> torch.Tensor:
    """The fused forward kernels: inputs read in their own dtype, ``y`` written channels-last in place."""
    return mix_forward(x, proxy, *weights, chunk_size, image_like(x, x.shape[1]))


def backward(grad, x, proxy, weights, chunk_size) -> list[torch.Tensor]:
    """The fused backward, in the compute dtype (the caller casts); ``dx`` written channels-last."""
    return mix_backward(grad, x, proxy, *weights, chunk_size)


# -------------------------------------------------------------------------------------------------
# Host side.


def _launch_config(
    slices: int, line_length: int, num_chunks: int, device: torch.device, kernel: str | None = None
) -> dict[str, Any]:
    """Variant and launch parameters of one direction's launch.

    Interpreter (CPU tensors): as few programs as possible (its cost is per program and operation):
    the register variant for lines up to 256, else the memory variant with 256-position blocks;
    up to 4096 elements per program. GPU: the register variant for lines up to 1024 positions,
    slice groups halved until there are 4 programs per SM, the tiles of a local scan spread over
    the second grid axis (memory variant: within a 256 MiB scratch), ~4 (register) or 8 (memory)
    elements per thread. Untuned: no GPU has run these kernels. ``kernel`` forces the variant (it
    takes precedence over :func:`gspn.ops._triton.launch_overrides`; the fallback after a failed
    register build asks for ``"memory"``).
    """
    interp = device.type == "cpu"
    whole = next_pow2(line_length)
    max_reg = INTERP_MAX_BLOCK_P if interp else GPU_MAX_REG_BLOCK_P
    fits = whole <= max_reg and (_REGISTER, whole) not in broken_builds
    kernel = kernel or _forced_kernel() or ("register" if fits else "memory")
    if kernel == "register":
        block_p = whole
    else:
        block_p = overrides.get("block_p") or min(whole, INTERP_MAX_BLOCK_P if interp else GPU_MAX_BLOCK_P)
    if interp:
        block_s = min(next_pow2(slices), max(1, INTERP_MAX_TILE // block_p))
        chunk_programs, num_warps = 1, 1
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        max_tile = GPU_MAX_REG_BLOCK_P if kernel == "register" else GPU_MAX_TILE
        block_s = min(next_pow2(slices), max(1, max_tile // block_p))
        while block_s > 1 and cdiv(slices, block_s) * num_chunks < 4 * sms:
            block_s //= 2
        slice_programs = cdiv(slices, block_s)
        chunk_programs = min(num_chunks, max(1, cdiv(4 * sms, slice_programs)))
        if kernel == "memory":
            per_program = slice_programs * block_s * 2 * line_length * 4
            chunk_programs = max(1, min(chunk_programs, MAX_SCRATCH_BYTES // max(per_program, 1)))
        per_thread = 4 if kernel == "register" else 8
        num_warps = max(4, min(16, block_s * block_p // (32 * per_thread)))
    cfg = {
        "kernel": kernel,
        "block_s": block_s,
        "block_p": block_p,
        "chunk_programs": chunk_programs,
        "num_warps": num_warps,
    }
    cfg.update({k: v for k, v in overrides.items() if k in ("block_s", "chunk_programs", "num_warps")})
    cfg["chunk_programs"] = max(1, min(cfg["chunk_programs"], num_chunks, 65535))
    return cfg


def _forced_kernel() -> str | None:
    """The variant forced by :func:`gspn.ops._triton.launch_overrides` (``kernel=``), if this module
    has it: ``"register"`` or ``"memory"`` (a forced ``"split"`` only concerns the line scan)."""
    kernel = overrides.get("kernel")
    return kernel if kernel in ("register", "memory") else None


def _pack_weights(gate_weight, lam_weight, u_weight, skip_weight, merge_weight, dtype) -> torch.Tensor:
    """``(4, C, 6, S)`` in ``dtype``: gate logits (expanded from ``Cg`` to ``C``), λ, ``m_k u_k``
    and (the same for every k) the merged skip ``Σ_k m_k D_k``."""
    channels = lam_weight.shape[1]
    gate_weight, lam_weight, u_weight, skip_weight, merge_weight = (
        t.to(dtype) for t in (gate_weight, lam_weight, u_weight, skip_weight, merge_weight)
    )
    gates = gate_weight.repeat_interleave(channels // gate_weight.shape[2], dim=2)  # (4, 3, C, S)
    u_scaled = merge_weight.view(-1, 1, 1) * u_weight
    skip = torch.einsum("k,kcs->cs", merge_weight, skip_weight).expand_as(lam_weight)
    kinds = torch.cat([gates, lam_weight.unsqueeze(1), u_scaled.unsqueeze(1), skip.unsqueeze(1)], dim=1)
    return kinds.transpose(1, 2).contiguous()  # (4, C, 6, S)


def _strides4(t: torch.Tensor) -> tuple[int, int, int, int]:
    """Strides of a ``(B, C, H, W)`` tensor, with 0 along size-1 dimensions (never stepped)."""
    return tuple(st if n > 1 else 0 for st, n in zip(t.stride(), t.shape, strict=True))  # type: ignore[return-value]


def mix_forward(
    x: torch.Tensor,
    proxy: torch.Tensor,
    gate_weight: torch.Tensor,
    lam_weight: torch.Tensor,
    u_weight: torch.Tensor,
    skip_weight: torch.Tensor,
    merge_weight: torch.Tensor,
    chunk_size: int | None,
    out: torch.Tensor,
) -> torch.Tensor:
    """The fused forward of :func:`gspn.ops.gspn_mix` into ``out`` (four launches; see the module doc).

    Args:
        x: ``(B, C, H, W)``, ``proxy``: ``(B, S, H, W)``, any strides, float32/float64/bfloat16/float16
            (read in their own dtype).
        gate_weight: ``(4, 3, Cg, S)``; lam_weight, u_weight, skip_weight: ``(4, C, S)``;
            merge_weight: ``(4,)`` (any float dtype; packed in the accumulation dtype).
        chunk_size: ``None`` (global scans) or the tile length along each scan axis.
        out: ``(B, C, H, W)`` result buffer, any strides and float dtype; must not overlap the inputs.

    Arguments are assumed validated (:func:`gspn.ops.gspn_mix` does it) and ``x.numel() > 0``.
    Accumulation is float64 if ``x`` is float64, else float32.

    Returns:
        ``out``.
    """
    kernels = _kernels()
    batch, channels, height, width = x.shape
    state = proxy.shape[1]
    acc_torch, acc = acc_dtype(x)
    w = _pack_weights(gate_weight, lam_weight, u_weight, skip_weight, merge_weight, acc_torch)
    y_acc = out if out.dtype == acc_torch else torch.empty(x.shape, dtype=acc_torch, device=x.device)
    slices = batch * channels
    strides = (*_strides4(x), *_strides4(proxy), *_strides4(y_acc), *_strides4(out))
    for k, name in enumerate(DIRECTIONS):
        d = get_direction(name)
        num_lines, line_length = (height, width) if d.vertical else (width, height)
        chunk = min(chunk_size or num_lines, num_lines)
        num_chunks = cdiv(num_lines, chunk)
        cfg = _launch_config(slices, line_length, num_chunks, x.device)
        grid = (cdiv(slices, cfg["block_s"]), cfg["chunk_programs"])
        scalars = (slices, channels, state, num_lines, line_length, chunk, num_chunks)
        flags = {
            "VERTICAL": d.vertical,
            "REVERSE": d.reverse,
            "FIRST": k == 0,
            "LAST": k == len(DIRECTIONS) - 1,
            "ACC": acc,
            "BLOCK_S": cfg["block_s"],
            "num_warps": cfg["num_warps"],
        }
        if cfg["kernel"] == "register":
            try:
                kernels.gspn_mix_fwd_reg_kernel[grid](
                    x, proxy, w[k], y_acc, out, *strides, *scalars, **flags, STORE_H=False, BLOCK_P=cfg["block_p"]
                )
                continue
            except Exception as exc:  # a GPU whose Triton cannot build tl.gather: the memory variant
                if x.device.type != "cuda" or not cannot_build(exc):
                    raise
                broken_builds.add((_REGISTER, cfg["block_p"]))
                warnings.warn(
                    f"gspn: the register gspn_mix Triton kernel cannot be built on this GPU for lines of up to "
                    f"{cfg['block_p']} positions ({type(exc).__name__}: {str(exc)[:300]}); using the memory "
                    "variant for them from now on",
                    RuntimeWarning,
                    stacklevel=2,
                )
                cfg = _launch_config(slices, line_length, num_chunks, x.device, kernel="memory")
                grid = (cdiv(slices, cfg["block_s"]), cfg["chunk_programs"])
                flags.update(BLOCK_S=cfg["block_s"], num_warps=cfg["num_warps"])
        scratch = torch.empty(cfg["chunk_programs"] * slices * 2 * line_length, dtype=acc_torch, device=x.device)
        kernels.gspn_mix_fwd_kernel[grid](
            x, proxy, w[k], y_acc, out, scratch, *strides, *scalars, **flags, BLOCK_P=cfg["block_p"]
        )
    return out


def _backward_config(batch: int, channels: int, state: int, line_length: int, num_chunks: int, device: torch.device):
    """Launch parameters of the fused adjoint (register kernel), or ``None`` where it does not apply:
    lines longer than one register block (1024 positions on a GPU, 256 in the interpreter), a GPU
    where that block size failed to build, or ``kernel="memory"`` forced by :func:`gspn.ops._triton.launch_overrides`.

    A program owns ``block_s`` channels of one batch element (its proxy gradients are summed over
    those channels in registers). Its 1×1 products are ``[block_s, block_j, block_p]`` broadcasts
    (``block_j = next_pow2(S)``), kept to at most 2048 elements on a GPU (more spills registers;
    a single channel of a line longer than ``2048 / block_j`` exceeds it and spills); slice groups are halved
    until there are 4 programs per SM and the tiles of a local scan spread over the second grid
    axis, as in the forward. Untuned: no GPU has run it.
    """
    interp = device.type == "cpu"
    block_p = next_pow2(line_length)
    block_j = next_pow2(state)
    if _forced_kernel() == "memory" or (_REGISTER, block_p) in broken_builds:
        return None
    if block_p > (INTERP_MAX_BLOCK_P if interp else GPU_MAX_REG_BLOCK_P):
        return None
    if interp:
        block_s = min(next_pow2(channels), max(1, INTERP_MAX_TILE // block_p))
        chunk_programs, num_warps = 1, 1
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        block_s = min(
            next_pow2(channels),
            max(1, GPU_MAX_REG_BLOCK_P // block_p),
            max(1, _GPU_MAX_PRODUCT // (block_p * block_j)),
        )
        while block_s > 1 and batch * cdiv(channels, block_s) * num_chunks < 4 * sms:
            block_s //= 2
        chunk_programs = min(num_chunks, max(1, cdiv(4 * sms, batch * cdiv(channels, block_s))))
        num_warps = max(4, min(16, block_s * block_p // (32 * 4)))
    cfg = {
        "block_s": block_s,
        "block_j": block_j,
        "block_p": block_p,
        "chunk_programs": chunk_programs,
        "num_warps": num_warps,
    }
    cfg.update({k: v for k, v in overrides.items() if k in ("block_s", "chunk_programs", "num_warps")})
    cfg["chunk_programs"] = max(1, min(cfg["chunk_programs"], num_chunks, 65535))
    return cfg


def _fused_backward(grad, x, proxy, gate_weight, lam_weight, u_weight, skip_weight, merge_weight, chunk_size):
    """The fused backward (two launches per direction; see the module doc), or ``None`` if a
    direction's lines do not fit the register kernel (:func:`_backward_config`)."""
    kernels = _kernels()
    batch, channels, height, width = x.shape
    state = proxy.shape[1]
    gate_channels = gate_weight.shape[2]
    acc_torch, acc = acc_dtype(x)
    geometry = []
    for name in DIRECTIONS:
        d = get_direction(name)
        num_lines, line_length = (height, width) if d.vertical else (width, height)
        chunk = min(chunk_size or num_lines, num_lines)
        num_chunks = cdiv(num_lines, chunk)
        cfg = _backward_config(batch, channels, state, line_length, num_chunks, x.device)
        if cfg is None:
            return None
        geometry.append((d, num_lines, line_length, chunk, num_chunks, cfg))
    w = _pack_weights(gate_weight, lam_weight, u_weight, skip_weight, merge_weight, acc_torch)
    h = torch.empty(x.shape, dtype=acc_torch, device=x.device)
    dx = x.new_zeros((batch, height, width, channels), dtype=acc_torch).permute(0, 3, 1, 2)
    nblk = max(cdiv(channels, g[-1]["block_s"]) for g in geometry)
    dz = torch.zeros((nblk, batch, state, height, width), dtype=acc_torch, device=x.device)
    dw = []
    slices = batch * channels
    for k, (d, num_lines, line_length, chunk, num_chunks, cfg) in enumerate(geometry):
        # Recompute h_k (the register forward kernel, slices b·C + c) ...
        fcfg = _launch_config(slices, line_length, num_chunks, x.device)
        strides = (*_strides4(x), *_strides4(proxy), *_strides4(h), *_strides4(h))
        scalars = (slices, channels, state, num_lines, line_length, chunk, num_chunks)
        kernels.gspn_mix_fwd_reg_kernel[(cdiv(slices, fcfg["block_s"]), fcfg["chunk_programs"])](
            x,
            proxy,
            w[k],
            h,
            h,
            *strides,
            *scalars,
            VERTICAL=d.vertical,
            REVERSE=d.reverse,
            FIRST=False,
            LAST=False,
            STORE_H=True,
            ACC=acc,
            BLOCK_S=fcfg["block_s"],
            BLOCK_P=next_pow2(line_length),
            num_warps=fcfg["num_warps"],
        )
        # ... then its adjoint, channel groups of one batch element per program.
        blocks = cdiv(channels, cfg["block_s"])
        dw_k = torch.empty(
            (cfg["chunk_programs"], batch, channels, kernels.KINDS.value, state), dtype=acc_torch, device=x.device
        )
        dz_k = dz[:blocks]
        kernels.gspn_mix_bwd_reg_kernel[(batch * blocks, cfg["chunk_programs"])](
            grad,
            x,
            proxy,
            w[k],
            h,
            dx,
            dz_k,
            dw_k,
            *_strides4(grad),
            *_strides4(x),
            *_strides4(proxy),
            *_strides4(h),
            *_strides4(dx),
            *dz_k.stride(),
            batch,
            channels,
            state,
            num_lines,
            line_length,
            chunk,
            num_chunks,
            blocks,
            VERTICAL=d.vertical,
            REVERSE=d.reverse,
            FIRST=k == 0,
            ACC=acc,
            BLOCK_S=cfg["block_s"],
            BLOCK_J=cfg["block_j"],
            BLOCK_P=cfg["block_p"],
            num_warps=cfg["num_warps"],
        )
        dw.append(dw_k.sum((0, 1)))  # (C, 6, S)
    dw = torch.stack(dw)  # (4, C, 6, S): gradients of the packed weights
    m = merge_weight.to(acc_torch)
    group = channels // gate_channels
    d_gate_weight = dw[:, :, :3].reshape(4, gate_channels, group, 3, state).sum(2).transpose(1, 2)
    d_u_scaled = dw[:, :, 4]
    d_skip_merged = dw[0, :, 5]  # gradient of Σ_k m_k skip_weight[k]
    d_merge = (u_weight * d_u_scaled).sum((1, 2)) + (skip_weight * d_skip_merged).sum((1, 2))
    return [
        dx,
        dz.sum(0),
        d_gate_weight,
        dw[:, :, 3],
        m.view(-1, 1, 1) * d_u_scaled,
        m.view(-1, 1, 1) * d_skip_merged,
        d_merge,
    ]


def mix_backward(grad, x, proxy, gate_weight, lam_weight, u_weight, skip_weight, merge_weight, chunk_size):
    """Gradients of :func:`gspn.ops.gspn_mix` (see the module doc).

    The fused kernels when every direction's lines fit one register block; otherwise (and on a GPU
    where they cannot be built) the per-direction recomputation through the line-scan kernels.

    Args:
        grad, x: ``(B, C, H, W)``; proxy: ``(B, S, H, W)``; weights as :func:`mix_forward`'s. All in
            one accumulation dtype (float32 or float64), any strides.
        chunk_size: ``None`` or the tile length.

    Returns:
        ``[dx, dproxy, d_gate_weight, d_lam_weight, d_u_weight, d_skip_weight, d_merge_weight]``.
    """
    args = (grad, x, proxy, gate_weight, lam_weight, u_weight, skip_weight, merge_weight, chunk_size)
    try:
        outs = _fused_backward(*args)
    except Exception as exc:
        if x.device.type != "cuda" or not cannot_build(exc):
            raise
        broken_builds.update((_REGISTER, next_pow2(n)) for n in x.shape[2:])
        warnings.warn(
            f"gspn: the fused gspn_mix Triton backward cannot be built on this GPU ({type(exc).__name__}: "
            f"{str(exc)[:300]}); recomputing through the line-scan kernels instead",
            RuntimeWarning,
            stacklevel=2,
        )
        outs = None
    if outs is not None:
        return outs
    return _backward_by_scans(*args)


def _backward_by_scans(grad, x, proxy, gate_weight, lam_weight, u_weight, skip_weight, merge_weight, chunk_size):
    """The backward through the line-scan kernels, one direction at a time (arguments and result as
    :func:`mix_backward`'s; ``dx``/``dproxy`` contiguous NCHW)."""
    grad, x, proxy = (t.contiguous() for t in (grad, x, proxy))  # the scan kernels need dense planes
    channels = x.shape[1]
    gate_channels = gate_weight.shape[2]
    group = channels // gate_channels
    gx = grad * x
    e = torch.einsum("bchw,bshw->cs", gx, proxy)  # Σ_hw (g ⊙ x) proxyᵀ
    skip_merged = torch.einsum("k,kcs->cs", merge_weight, skip_weight)
    d_skip_weight = merge_weight.view(-1, 1, 1) * e
    d_merge = (skip_weight * e).sum((1, 2))
    dproxy = torch.einsum("cs,bchw->bshw", skip_merged, gx)
    del gx
    dx = torch.einsum("cs,bshw->bchw", skip_merged, proxy).mul_(grad)  # (Σ_k m_k D_k) ⊙ g
    d_gate_weight = torch.empty_like(gate_weight)
    d_lam_weight = torch.empty_like(lam_weight)
    d_u_weight = torch.empty_like(u_weight)
    d_merge_u = []
    for k, name in enumerate(DIRECTIONS):
        gates = torch.einsum("gcs,bshw->gbchw", gate_weight[k], proxy)  # (3, B, Cg, H, W)
        lam = torch.einsum("cs,bshw->bchw", lam_weight[k], proxy)
        u = torch.einsum("cs,bshw->bchw", u_weight[k], proxy)
        h = torch.empty_like(x)
        scan_backend.scan(
            x, lam, gates[0], gates[1], gates[2], direction=name, chunk_size=chunk_size, normalize=True, out=h
        )
        gu = grad * u
        del u
        d_merge_u.append((gu * h).sum())
        du = (grad * h).mul_(merge_weight[k])  # dL/du_k = m_k g ⊙ h_k
        dh = gu.mul_(merge_weight[k])  # dL/dh_k = m_k g ⊙ u_k
        d_params = [torch.empty_like(x) for _ in range(4)]
        scan_backend.scan_backward(
            dh,
            h,
            x,
            lam,
            gates[0],
            gates[1],
            gates[2],
            direction=name,
            chunk_size=chunk_size,
            normalize=True,
            dx=dx,
            accumulate_dx=True,
            d_params=d_params,
        )
        del dh, h, lam, gates
        dlam = d_params[0]
        batch, _, height, width = x.shape
        dgates = torch.stack(d_params[1:]).view(3, batch, gate_channels, group, height, width).sum(3)
        del d_params
        d_gate_weight[k] = torch.einsum("gbchw,bshw->gcs", dgates, proxy)
        d_lam_weight[k] = torch.einsum("bchw,bshw->cs", dlam, proxy)
        d_u_weight[k] = torch.einsum("bchw,bshw->cs", du, proxy)
        dproxy += (
            torch.einsum("gcs,gbchw->bshw", gate_weight[k], dgates)
            + torch.einsum("cs,bchw->bshw", lam_weight[k], dlam)
            + torch.einsum("cs,bchw->bshw", u_weight[k], du)
        )
    d_merge = d_merge + torch.stack(d_merge_u)
    return [dx, dproxy, d_gate_weight, d_lam_weight, d_u_weight, d_skip_weight, d_merge]
