"""CPU backend of the fused layer: the C++ kernel ``gspn/ops/csrc/gspn_mix.cpp``.

Channels-last, one batch element × 16 channels per work item, every pixel's gate logits, λ and u
generated from the proxy in registers where the scan needs them; the backward recomputes each
direction's hidden state (one direction and one channel block at a time) instead of storing four
hidden maps. The library is built on first use (:mod:`gspn.ops._cpu`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._cpu import DTYPES, call, is_available, library, unavailable_reason
from ..directions import DIRECTIONS

__all__ = [
    "NATIVE_DTYPES",
    "backward",
    "forward",
    "is_available",
    "mix_backward",
    "mix_forward",
    "mix_lanes",
    "mix_x_strides",
    "unavailable_reason",
]

NATIVE_DTYPES = False
"""The kernels read float32/float64 only: the caller up-casts float16/bfloat16 inputs."""

_NUM_DIRECTIONS = len(DIRECTIONS)


def _pad_channels(t: torch.Tensor, padded: int, dim: int) -> torch.Tensor:
    extra = padded - t.shape[dim]
    if extra == 0:
        return t
    pad = [0, 0] * (t.ndim - 1 - dim % t.ndim) + [0, extra]
    return F.pad(t, pad)


def _pack_weights(gate_weight, lam_weight, u_weight, skip_weight, merge_weight, channels: int, lanes: int):
    """Kernel weight layout: ``w (nblk, 4, 5, S, lanes)`` with u pre-scaled by the merge weights,
    and the merged skip ``d = Σ_k m_k D_k`` as ``(nblk, S, lanes)``."""
    state = lam_weight.shape[2]
    padded = -(-channels // lanes) * lanes
    gates = gate_weight.repeat_interleave(channels // gate_weight.shape[2], dim=2)  # (4, 3, C, S)
    u_scaled = merge_weight.view(-1, 1, 1) * u_weight
    kinds = torch.cat([gates, lam_weight.unsqueeze(1), u_scaled.unsqueeze(1)], dim=1)  # (4, 5, C, S)
    kinds = _pad_channels(kinds, padded, 2).view(_NUM_DIRECTIONS, 5, padded // lanes, lanes, state)
    w = kinds.permute(2, 0, 1, 4, 3).contiguous()
    skip = _pad_channels(torch.einsum("k,kcs->cs", merge_weight, skip_weight), padded, 0)
    d = skip.view(padded // lanes, lanes, state).transpose(1, 2).contiguous()
    return w, d


def _channels_last(t: torch.Tensor, padded: int) -> torch.Tensor:
    """``(B, C, H, W)`` → dense ``(B, H, W, padded)`` (free for a channels-last input of C = padded)."""
    return _pad_channels(t.permute(0, 2, 3, 1), padded, 3).contiguous()


def _kernel_x(x: torch.Tensor, padded: int, planar: bool = True) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``x`` as the kernel reads it, and its strides: in place when dense (channels-last, or NCHW if
    ``planar``), else a padded channels-last copy."""
    strides = mix_x_strides(x, padded)
    if strides is not None and (planar or strides[1] == 1):
        return x, strides
    x_cl = _channels_last(x, padded)
    batch, height, width, _ = x_cl.shape
    return x_cl, (height * width * padded if batch > 1 else 0, 1, padded)


def _to_image(t_cl: torch.Tensor, channels: int) -> torch.Tensor:
    """``(B, H, W, Cp)`` → ``(B, C, H, W)`` in channels-last memory format."""
    if t_cl.shape[3] != channels:
        t_cl = t_cl[..., :channels].contiguous()
    return t_cl.permute(0, 3, 1, 2)


def forward(x, proxy, weights, chunk_size) -> torch.Tensor:
    """``y`` of the kernel, channels-last."""
    batch, channels, height, width = x.shape
    lanes = mix_lanes()
    padded = -(-channels // lanes) * lanes
    w, d = _pack_weights(*weights, channels, lanes)
    x_k, x_strides = _kernel_x(x, padded)
    z_cl = _channels_last(proxy, proxy.shape[1])
    y = torch.empty((batch, height, width, padded), dtype=x.dtype, device=x.device)
    mix_forward(x_k, x_strides, z_cl, w, d, chunk_size, y)
    return _to_image(y, channels)


def backward(grad, x, proxy, weights, chunk_size) -> list[torch.Tensor]:
    """The seven gradients of the kernel (``dx``, ``dproxy`` channels-last)."""
    gate_weight, _, u_weight, skip_weight, merge_weight = weights
    batch, channels, height, width = x.shape
    state = proxy.shape[1]
    lanes = mix_lanes()
    padded = -(-channels // lanes) * lanes
    nblk = padded // lanes
    w, d = _pack_weights(*weights, channels, lanes)
    # The backward reads x five times per direction pair (recomputation and adjoint, column scans
    # included), where strided per-pixel reads of NCHW planes cost more than one channels-last copy.
    x_k, x_strides = _kernel_x(x, padded, planar=False)
    z_cl, g_cl = _channels_last(proxy, state), _channels_last(grad, padded)
    dx = torch.empty_like(g_cl)
    dz_part = torch.empty((nblk, batch, height, width, state), dtype=x.dtype, device=x.device)
    dw_part = torch.empty((batch, *w.shape), dtype=x.dtype, device=x.device)
    dd_part = torch.empty((batch, *d.shape), dtype=x.dtype, device=x.device)
    mix_backward(x_k, x_strides, z_cl, w, d, g_cl, chunk_size, dx, dz_part, dw_part, dd_part)
    # (nblk, 4, 5, S, lanes) → (4, 5, C, S)
    dw = dw_part.sum(0).permute(1, 2, 0, 4, 3).reshape(_NUM_DIRECTIONS, 5, padded, state)[:, :, :channels]
    dd = dd_part.sum(0).transpose(1, 2).reshape(padded, state)[:channels]
    group = channels // gate_weight.shape[2]
    d_gate_weight = dw[:, :3].reshape(_NUM_DIRECTIONS, 3, gate_weight.shape[2], group, state).sum(3)
    d_u_scaled = dw[:, 4]
    m = merge_weight.view(-1, 1, 1)
    d_merge = (u_weight * d_u_scaled).sum((1, 2)) + (skip_weight * dd).sum((1, 2))
    return [
        _to_image(dx, channels),
        dz_part.sum(0).permute(0, 3, 1, 2),
        d_gate_weight,
        dw[:, 3].contiguous(),
        m * d_u_scaled,
        m * dd.unsqueeze(0),
        d_merge,
    ]


# --- the kernel calls (gspn_mix.cpp) ---------------------------------------------------------------


def mix_lanes() -> int:
    """Channels per work item of the fused layer kernel; the caller pads C to a multiple of it."""
    return library().gspn_mix_lanes()


def mix_x_strides(x: torch.Tensor, padded: int) -> tuple[int, int, int] | None:
    """``(batch, channel, pixel)`` element strides under which the fused kernel reads ``x (B, C, H, W)``
    in place, or ``None`` if it must be copied to a dense channels-last ``(B, H, W, padded)`` first.

    In place: channels-last dense (channel stride 1, pixel stride ``C``) or planar dense (pixel
    stride 1, channel stride ``H·W``), both only when ``C == padded``.
    """
    batch, channels, height, width = x.shape
    if channels != padded:
        return None
    sb = x.stride(0) if batch > 1 else 0
    if x.is_contiguous(memory_format=torch.channels_last) and (channels == 1 or x.stride(1) == 1):
        return sb, 1, channels
    if x.is_contiguous() and (height * width == 1 or x.stride(3) == 1):
        return sb, height * width, 1
    return None


def _mix_geometry(out_cl: torch.Tensor, x_strides, state: int, chunk_size) -> tuple:
    """Kernel arguments from a ``(B, H, W, Cp)`` output buffer's shape."""
    batch, height, width, padded = out_cl.shape
    return (
        DTYPES[out_cl.dtype],
        batch,
        padded,
        height,
        width,
        state,
        chunk_size or 0,
        torch.get_num_threads(),
        *x_strides,
    )


def _call_mix(kernel: str, geometry: tuple, tensors) -> None:
    call(kernel, *geometry, *(t.data_ptr() for t in tensors))


def mix_forward(x, x_strides, z_cl, w, d, chunk_size, y) -> None:
    """Fused layer forward into ``y (B, H, W, Cp)``; ``x`` read with ``x_strides`` (see
    :func:`mix_x_strides`); other layouts in ``gspn_mix.cpp`` (see :mod:`gspn.ops.gspn_mix.cpu`)."""
    geometry = _mix_geometry(y, x_strides, z_cl.shape[3], chunk_size)
    _call_mix("gspn_mix_forward", geometry, (x, z_cl, w, d, y))


def mix_backward(x, x_strides, z_cl, w, d, grad_cl, chunk_size, dx, dz_part, dw_part, dd_part) -> None:
    """Fused layer backward into ``dx`` and the per-item partial sums (see ``gspn_mix.cpp``).

    Allocates the recomputation scratch, ``H·W·lanes`` values per thread, through torch (so memory
    profilers see it); threads = ``min(torch.get_num_threads(), work items)``.
    """
    batch, height, width, padded = dx.shape
    lanes = mix_lanes()
    geometry = list(_mix_geometry(dx, x_strides, z_cl.shape[3], chunk_size))
    threads = max(1, min(geometry[7], batch * padded // lanes))
    geometry[7] = threads
    scratch = torch.empty((threads, height * width * lanes), dtype=dx.dtype, device=dx.device)
    tensors = (x, z_cl, w, d, grad_cl, dx, dz_part, dw_part, dd_part, scratch)
    _call_mix("gspn_mix_backward", tuple(geometry), tensors)
