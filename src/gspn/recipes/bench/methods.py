"""The token-mixing layers that ``gspn bench`` times, at one width, on square ``H×W`` inputs.

Every method is one layer that mixes ``N = H·W`` tokens of width ``C``:

* ``gspn-global`` / ``gspn-local``: :class:`gspn.nn.GSPN2d` (the 4-direction line scans *with* the
  module's own proxy projections ``C → d_state → 4·C``, gates, ``u``/``D`` terms and the merger, run
  as the fused operator :func:`gspn.ops.gspn_mix`) on a ``(B, C, H, W)`` map; local GSPN restarts
  the scans every ``local_chunk`` lines.
* ``gspn-global-unfused`` (opt-in): the same layer with ``fused=False``, every per-pixel parameter
  map materialised before :func:`gspn.ops.line_scan_4d` (what the layer ran before the fused operator).
* ``attention-math`` / ``attention-flash`` / ``attention-efficient``: multi-head self-attention with
  q/k/v and output projections (:class:`gspn.nn.MultiHeadSelfAttention`, as :class:`SelfAttention`)
  around :func:`torch.nn.functional.scaled_dot_product_attention`, pinned to one SDPA backend with
  :func:`torch.nn.attention.sdpa_kernel`, on ``(B, N, C)`` tokens.
* ``linear-attention``: :class:`gspn.nn.LinearAttention`, the same projections around the ``elu + 1``
  kernelised attention, ``O(N·d²)``.
* ``gspn-scan-global`` / ``gspn-scan-local`` (opt-in, not in :data:`DEFAULT_METHODS`): the bare
  operator :func:`gspn.ops.line_scan_4d` (4 directions, ``normalize=True``) on precomputed
  ``(B, 4, C, H, W)`` parameters, without the projections: the "single operator" of the paper's
  speed figure, and the share of :class:`~gspn.nn.GSPN2d`'s time spent scanning.
* ``mamba``: ``mamba_ssm.Mamba`` (1-D selective scan over the ``N`` tokens) when the package is
  importable and the device is CUDA; otherwise reported as absent.

Each method also carries its expected time exponent in pixels (used to predict, and skip, sizes that
would blow the time budget) and an analytic estimate of its largest intermediates (used to skip
sizes that would not fit in memory).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...nn.attention import LinearAttention, MultiHeadSelfAttention, linear_attention

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "LayerConfig",
    "LinearAttention",
    "MethodSpec",
    "SelfAttention",
    "Workload",
    "get_method",
    "iter_methods",
    "linear_attention",
]


@dataclass(frozen=True)
class LayerConfig:
    """Layer settings shared by all methods of one benchmark run."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    channels: int = 96
    heads: int = 3
    batch: int = 1
    d_state: int = 8
    local_chunk: int = 2
    backward: bool = False
    gspn_backend: str = "auto"


@dataclass
class Workload:
    """A built layer and its input, ready to be called as ``module(*inputs)`` under ``context()``."""

    module: nn.Module
    inputs: tuple[torch.Tensor, ...]
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    def __call__(self) -> torch.Tensor:
        with self.context():
            return self.module(*self.inputs)


@dataclass(frozen=True)
class MethodSpec:
    """One timed method.

    Attributes:
        name: identifier used on the command line and in ``results.json``.
        label: human-readable name for tables and plots.
        exponent: expected growth of time with the pixel count (1 = linear, 2 = quadratic).
        build: ``(config, height, width) -> Workload``.
        memory_bytes: ``(config, height, width) -> int``, analytic size of the tensors alive at the
            peak (forward, or forward+backward when ``config.backward``).
        unavailable: ``(config) -> str | None``, why the method cannot run (``None`` if it can).
    """

    name: str
    label: str
    exponent: float
    build: Callable[[LayerConfig, int, int], Workload]
    memory_bytes: Callable[[LayerConfig, int, int], int]
    unavailable: Callable[[LayerConfig], str | None]


# --- layers --------------------------------------------------------------------------------------


class SelfAttention(MultiHeadSelfAttention):
    """:class:`gspn.nn.MultiHeadSelfAttention` pinned to one SDPA backend.

    Args:
        dim: token width ``C`` (divisible by ``heads``).
        heads: number of heads.
        backend: SDPA backend (a :class:`torch.nn.attention.SDPBackend`) to pin with
            :func:`torch.nn.attention.sdpa_kernel`, or ``None`` to let PyTorch choose.

    Shapes: ``(B, N, C) → (B, N, C)``. Raises ``ValueError`` as :class:`~gspn.nn.MultiHeadSelfAttention`.
    """

    def __init__(self, dim: int, heads: int, backend: object | None = None) -> None:
        super().__init__(dim, heads)
        self.backend = backend

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.backend is None:
            return super().attend(q, k, v)
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(self.backend):
            return super().attend(q, k, v)


# --- builders ------------------------------------------------------------------------------------


def _finish(module: nn.Module, x: torch.Tensor, cfg: LayerConfig, context=contextlib.nullcontext) -> Workload:
    module = module.to(device=cfg.device, dtype=cfg.dtype)
    module.train(cfg.backward)
    x = x.to(device=cfg.device, dtype=cfg.dtype).requires_grad_(cfg.backward)
    return Workload(module, (x,), context)


def _gspn(chunk: bool, fused: bool = True) -> Callable[[LayerConfig, int, int], Workload]:
    def build(cfg: LayerConfig, height: int, width: int) -> Workload:
        from ...nn import GSPN2d

        module = GSPN2d(
            cfg.channels,
            d_state=cfg.d_state,
            chunk_size=cfg.local_chunk if chunk else None,
            backend=cfg.gspn_backend,
            fused=fused,
        )
        return _finish(module, torch.randn(cfg.batch, cfg.channels, height, width), cfg)

    return build


class Scan4d(nn.Module):
    """:func:`gspn.ops.line_scan_4d` as a module: ``(x, λ, w_left, w_mid, w_right) → (B, 4, C, H, W)``."""

    def __init__(self, chunk_size: int | None, backend: str = "auto") -> None:
        super().__init__()
        self.chunk_size = chunk_size
        self.backend = backend

    def forward(
        self, x: torch.Tensor, lam: torch.Tensor, w_left: torch.Tensor, w_mid: torch.Tensor, w_right: torch.Tensor
    ) -> torch.Tensor:
        """Four-direction scan with the stability-context normalisation of the gate logits."""
        from ...ops import line_scan_4d

        return line_scan_4d(
            x, lam, w_left, w_mid, w_right, chunk_size=self.chunk_size, normalize=True, backend=self.backend
        )


def _gspn_scan(chunk: bool) -> Callable[[LayerConfig, int, int], Workload]:
    def build(cfg: LayerConfig, height: int, width: int) -> Workload:
        module = Scan4d(cfg.local_chunk if chunk else None, cfg.gspn_backend)
        x = torch.randn(cfg.batch, cfg.channels, height, width)
        params = [torch.randn(cfg.batch, 4, cfg.channels, height, width) for _ in range(4)]
        inputs = tuple(t.to(device=cfg.device, dtype=cfg.dtype).requires_grad_(cfg.backward) for t in (x, *params))
        return Workload(module, inputs)

    return build


def _tokens(cfg: LayerConfig, height: int, width: int) -> torch.Tensor:
    return torch.randn(cfg.batch, height * width, cfg.channels)


def _attention(backend_name: str) -> Callable[[LayerConfig, int, int], Workload]:
    def build(cfg: LayerConfig, height: int, width: int) -> Workload:
        from torch.nn.attention import SDPBackend

        module = SelfAttention(cfg.channels, cfg.heads, getattr(SDPBackend, backend_name))
        return _finish(module, _tokens(cfg, height, width), cfg)

    return build


def _build_linear(cfg: LayerConfig, height: int, width: int) -> Workload:
    return _finish(LinearAttention(cfg.channels, num_heads=cfg.heads), _tokens(cfg, height, width), cfg)


def _build_mamba(cfg: LayerConfig, height: int, width: int) -> Workload:
    from mamba_ssm import Mamba  # optional dependency, checked by _mamba_unavailable

    return _finish(Mamba(d_model=cfg.channels), _tokens(cfg, height, width), cfg)


# --- availability --------------------------------------------------------------------------------


def _always(cfg: LayerConfig) -> str | None:
    return None


def _gspn_unavailable(cfg: LayerConfig) -> str | None:
    from ...ops.backends import resolve_backend

    try:
        resolve_backend(cfg.gspn_backend, cfg.device)
    except RuntimeError as exc:
        return str(exc)
    return None


def _sdpa_unavailable(backend_name: str) -> Callable[[LayerConfig], str | None]:
    def unavailable(cfg: LayerConfig) -> str | None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        head_dim = max(cfg.channels // max(cfg.heads, 1), 1)
        q = torch.zeros(1, 1, 8, head_dim, device=cfg.device, dtype=cfg.dtype, requires_grad=cfg.backward)
        try:
            with sdpa_kernel(getattr(SDPBackend, backend_name)):
                out = F.scaled_dot_product_attention(q, q, q)
                if cfg.backward:
                    out.sum().backward()
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return f"SDPA {backend_name} backend not supported for {cfg.device.type}/{cfg.dtype}: {first}"
        return None

    return unavailable


def _mamba_unavailable(cfg: LayerConfig) -> str | None:
    if importlib.util.find_spec("mamba_ssm") is None:
        return "mamba_ssm is not installed"
    if cfg.device.type != "cuda":
        return "mamba_ssm's selective scan needs CUDA"
    try:
        import mamba_ssm  # noqa: F401
    except Exception as exc:  # broken CUDA extensions raise all sorts of errors at import
        return f"mamba_ssm failed to import: {exc}"
    return None


# --- memory estimates ----------------------------------------------------------------------------


def _size(cfg: LayerConfig) -> int:
    return torch.empty((), dtype=cfg.dtype).element_size()


def _linear_memory(factor_fwd: float, factor_bwd: float, fp32_inside: bool = False):
    """``factor · B·N·C`` elements (``fp32_inside``: the intermediates are float32 whatever the dtype)."""

    def estimate(cfg: LayerConfig, height: int, width: int) -> int:
        size = max(_size(cfg), 4) if fp32_inside else _size(cfg)
        factor = factor_bwd if cfg.backward else factor_fwd
        return int(factor * cfg.batch * height * width * cfg.channels * size)

    return estimate


def _math_attention_memory(cfg: LayerConfig, height: int, width: int) -> int:
    n = height * width
    scores = cfg.batch * cfg.heads * n * n
    # forward: scores and their softmax; backward also keeps the softmax and builds its gradient.
    n_score_tensors = 4 if cfg.backward else 2
    return n_score_tensors * scores * _size(cfg) + _linear_memory(8, 16)(cfg, height, width)


# The fused GSPN2d allocates the proxy, the output and (backward) dx, the gradient's channels-last
# copy, the recomputed hidden state of one direction per thread: a few C per pixel. The unfused one
# keeps the proxy z, 12·Cg gate logits, λ/u/D (4·C each), the 4-direction hidden state (float32),
# u⊙h and y (4·C each) and the output: about 30·C per pixel, rounded up to 40.
_gspn_memory = _linear_memory(4, 12, fp32_inside=True)
_gspn_unfused_memory = _linear_memory(40, 100, fp32_inside=True)

METHODS: tuple[MethodSpec, ...] = (
    MethodSpec("gspn-global", "GSPN (global)", 1.0, _gspn(False), _gspn_memory, _gspn_unavailable),
    MethodSpec("gspn-local", "GSPN (local)", 1.0, _gspn(True), _gspn_memory, _gspn_unavailable),
    MethodSpec(
        "gspn-global-unfused",
        "GSPN (global, unfused)",
        1.0,
        _gspn(False, fused=False),
        _gspn_unfused_memory,
        _gspn_unavailable,
    ),
    MethodSpec(
        "attention-math",
        "self-attention (SDPA math)",
        2.0,
        _attention("MATH"),
        _math_attention_memory,
        _sdpa_unavailable("MATH"),
    ),
    MethodSpec(
        "attention-flash",
        "self-attention (SDPA flash)",
        2.0,
        _attention("FLASH_ATTENTION"),
        _linear_memory(10, 24),
        _sdpa_unavailable("FLASH_ATTENTION"),
    ),
    MethodSpec(
        "attention-efficient",
        "self-attention (SDPA mem-efficient)",
        2.0,
        _attention("EFFICIENT_ATTENTION"),
        _linear_memory(10, 24),
        _sdpa_unavailable("EFFICIENT_ATTENTION"),
    ),
    MethodSpec("linear-attention", "linear attention (elu+1)", 1.0, _build_linear, _linear_memory(12, 30), _always),
    MethodSpec("mamba", "Mamba (mamba_ssm)", 1.0, _build_mamba, _linear_memory(20, 50), _mamba_unavailable),
    # opt-in: the bare scan operator, inputs 17·C + output 4·C per pixel (float32 inside)
    MethodSpec(
        "gspn-scan-global",
        "GSPN scan only (global)",
        1.0,
        _gspn_scan(False),
        _linear_memory(24, 60, fp32_inside=True),
        _gspn_unavailable,
    ),
    MethodSpec(
        "gspn-scan-local",
        "GSPN scan only (local)",
        1.0,
        _gspn_scan(True),
        _linear_memory(24, 60, fp32_inside=True),
        _gspn_unavailable,
    ),
)

#: Methods run when ``BenchConfig.methods`` is ``None``: the layers of the paper's speed figure.
DEFAULT_METHODS: tuple[str, ...] = (
    "gspn-global",
    "gspn-local",
    "attention-math",
    "attention-flash",
    "attention-efficient",
    "linear-attention",
    "mamba",
)


def get_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` called ``name`` (``KeyError`` listing the valid names otherwise)."""
    for method in METHODS:
        if method.name == name:
            return method
    raise KeyError(f"unknown method {name!r}; choose from {', '.join(m.name for m in METHODS)}")


def iter_methods(names: list[str] | None = None) -> Iterator[MethodSpec]:
    """The methods named in ``names`` in the canonical order; ``None`` gives :data:`DEFAULT_METHODS`
    and ``["all"]`` every method."""
    if names is None:
        names = list(DEFAULT_METHODS)
    elif "all" in names:
        names = [m.name for m in METHODS]
    wanted = {get_method(n).name for n in names}
    yield from (m for m in METHODS if m.name in wanted)
