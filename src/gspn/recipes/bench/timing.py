"""Timing loop of ``gspn bench``: warm-up, median of repeats, peak memory, and skip-don't-crash rules.

For every method the resolutions are visited in increasing order. A configuration is

* ``absent`` when the method cannot run here (missing package, unsupported SDPA backend, ...);
* ``skip:memory`` when the method's analytic memory estimate exceeds the memory limit
  (80 % of the available RAM / free GPU memory unless given);
* ``skip:time`` when the time predicted from the previous measured size with the method's expected
  exponent (``t · (N / N_prev)^p``) would not fit one warm-up and one timed call in the budget;
  the method is then stopped for all larger sizes;
* ``over-budget`` when the first (warm-up) call alone took longer than the budget: its time is
  recorded but not used in the fits, and larger sizes are skipped;
* ``oom`` / ``error`` when building or running the layer raised (out of memory, ``RuntimeError``);
  larger sizes of that method are skipped;
* ``ok`` otherwise: ``median_ms`` is the median of up to ``repeats`` timed calls after the warm-up
  (fewer when the budget does not allow them).

Peak memory is the extra memory allocated during one call, above the parameters and the input: on
CUDA from ``torch.cuda.max_memory_allocated``; on CPU from the allocations tracked by
``torch.profiler`` (``profile_memory=True``, one extra call, running sum of allocations and frees);
the analytic estimate used for skipping is reported beside it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch

from .methods import LayerConfig, MethodSpec, Workload

__all__ = ["Result", "available_memory_bytes", "benchmark", "cpu_peak_bytes", "make_step", "measure", "warm_up"]

OK = "ok"
ABSENT = "absent"
SKIP_MEMORY = "skip:memory"
SKIP_TIME = "skip:time"
OVER_BUDGET = "over-budget"
OOM = "oom"
ERROR = "error"


@dataclass
class Result:
    """One (method, resolution) configuration of a run."""

    method: str
    label: str
    resolution: int
    pixels: int
    status: str
    median_ms: float | None = None
    min_ms: float | None = None
    times_ms: list[float] = field(default_factory=list)
    first_call_ms: float | None = None
    peak_mem_bytes: int | None = None
    mem_source: str | None = None
    est_mem_bytes: int | None = None
    predicted_ms: float | None = None
    note: str = ""

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def available_memory_bytes(device: torch.device) -> int:
    """Free memory for new tensors: ``MemAvailable`` on CPU (Linux), free GPU memory on CUDA."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30  # unknown platform: assume 8 GiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(workload: Workload, backward: bool) -> Callable[[], None]:
    """One forward (under ``inference_mode``) or forward+backward call of ``workload``."""
    if not backward:

        def forward() -> None:
            with torch.inference_mode():
                workload()

        return forward

    leaves = [t for t in workload.inputs if t.requires_grad]
    leaves += [p for p in workload.module.parameters() if p.requires_grad]
    grad_out: list[torch.Tensor] = []

    def forward_backward() -> None:
        out = workload()
        if not grad_out:
            grad_out.append(torch.randn_like(out))
        torch.autograd.grad(out, leaves, grad_out[0])

    return forward_backward


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ side logs start/stop lines there)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_bytes(step: Callable[[], None]) -> int | None:
    """Peak of the running sum of CPU allocations minus frees during one ``step()``, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except Exception:  # the profiler's internals vary between versions: fall back to the estimate
        return None
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        if event.device_type() == torch.autograd.DeviceType.CPU:
            running += event.nbytes()
            peak = max(peak, running)
    return peak


def _timed(step: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


def measure(
    workload: Workload,
    config: LayerConfig,
    *,
    budget_s: float,
    repeats: int,
    measure_memory: bool = True,
) -> tuple[str, dict]:
    """Time one built layer: a warm-up call, then up to ``repeats`` timed calls within ``budget_s``.

    Returns ``(status, fields)`` with ``status`` ``"ok"`` or ``"over-budget"`` and ``fields`` the
    :class:`Result` attributes measured (times in ms, peak memory).
    """
    device = config.device
    step = make_step(workload, config.backward)
    if device.type == "cuda":
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    first = _timed(step, device)
    fields: dict = {"first_call_ms": first * 1e3}
    if first > budget_s:
        ms = first * 1e3
        return OVER_BUDGET, {**fields, "median_ms": ms, "min_ms": ms, "times_ms": [ms]}
    remaining = budget_s - (time.perf_counter() - started)
    n = max(1, min(repeats, int(remaining / max(first, 1e-9))))
    times = [_timed(step, device) for _ in range(n)]
    fields.update(
        median_ms=statistics.median(times) * 1e3,
        min_ms=min(times) * 1e3,
        times_ms=[t * 1e3 for t in times],
    )
    if measure_memory:
        if device.type == "cuda":
            fields.update(
                peak_mem_bytes=int(torch.cuda.max_memory_allocated(device) - baseline),
                mem_source="cuda.max_memory_allocated",
            )
        elif time.perf_counter() - started + statistics.median(times) <= budget_s:
            peak = cpu_peak_bytes(step)
            if peak is not None:
                fields.update(peak_mem_bytes=peak, mem_source="torch.profiler")
    return OK, fields


def warm_up(method: MethodSpec, config: LayerConfig, side: int = 16) -> None:
    """Run ``method`` twice on a tiny input so one-time costs (kernel builds, lazy initialisation,
    first-use dispatch) are not charged to the first timed size. Errors are ignored here: the timed
    run reports them."""
    workload = None
    try:
        workload = method.build(config, side, side)
        step = make_step(workload, config.backward)
        step()
        step()
        _sync(config.device)
    except (RuntimeError, MemoryError, ValueError):
        failed = True
    else:
        failed = False
    del workload
    _release(config.device, collect=failed)


def _is_oom(exc: BaseException) -> bool:
    return (
        isinstance(exc, (torch.OutOfMemoryError, MemoryError))
        or "out of memory" in str(exc).lower()
        or ("DefaultCPUAllocator" in str(exc))
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _release(device: torch.device, collect: bool = False) -> None:
    """Free what the last configuration left. Tensors go with their last reference; ``collect`` also
    runs the cycle collector (0.1 s a call), needed after an exception whose traceback holds frames."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def benchmark(
    config: LayerConfig,
    methods: Sequence[MethodSpec],
    resolutions: Sequence[int],
    *,
    budget_s: float = 10.0,
    repeats: int = 5,
    memory_limit_bytes: int | None = None,
    measure_memory: bool = True,
    log: Callable[[str], None] | None = print,
) -> list[Result]:
    """Run every method over the square ``resolutions`` (ascending) and return one :class:`Result` each.

    Never raises for a configuration that fails: see the module docstring for the statuses.
    """
    log = log or (lambda _msg: None)
    resolutions = sorted(set(resolutions))
    if memory_limit_bytes is None:
        memory_limit_bytes = int(0.8 * available_memory_bytes(config.device))
    results: list[Result] = []
    for method in methods:
        reason = method.unavailable(config)
        if reason is None:
            warm_up(method, config, side=min(16, resolutions[0]))
        last: tuple[int, float] | None = None  # (pixels, seconds) of the last measured size
        stopped: tuple[str, str] | None = None  # (status, note) applied to all larger sizes
        for res in resolutions:
            pixels = res * res
            result = Result(
                method.name, method.label, res, pixels, OK, est_mem_bytes=method.memory_bytes(config, res, res)
            )
            results.append(result)
            if reason is not None:
                result.status, result.note = ABSENT, reason
                continue
            if stopped is not None:
                result.status, result.note = stopped
                continue
            if result.est_mem_bytes > memory_limit_bytes:
                result.status = SKIP_MEMORY
                result.note = (
                    f"needs ~{result.est_mem_bytes / 2**30:.1f} GiB > limit {memory_limit_bytes / 2**30:.1f} GiB"
                )
                log(f"  {method.name:<20} {res:>6}²  {result.status} ({result.note})")
                continue
            if last is not None:
                predicted = last[1] * (pixels / last[0]) ** method.exponent
                result.predicted_ms = predicted * 1e3
                if 2 * predicted > budget_s:
                    result.status = SKIP_TIME
                    result.note = f"predicted {predicted:.2f} s/call (x2 for warm-up) > budget {budget_s:g} s"
                    stopped = (SKIP_TIME, f"stopped: {res}² predicted over the {budget_s:g} s budget")
                    log(f"  {method.name:<20} {res:>6}²  {result.status} ({result.note})")
                    continue
            workload = None
            try:
                workload = method.build(config, res, res)
                status, fields = measure(
                    workload, config, budget_s=budget_s, repeats=repeats, measure_memory=measure_memory
                )
            except (RuntimeError, MemoryError, ValueError) as exc:  # OutOfMemoryError is a RuntimeError
                result.status = OOM if _is_oom(exc) else ERROR
                result.note = _first_line(exc)
                stopped = (result.status, f"stopped after {result.status} at {res}²")
            else:
                for key, value in fields.items():
                    setattr(result, key, value)
                result.status = status
                if status == OVER_BUDGET:
                    result.note = f"first call {fields['first_call_ms'] / 1e3:.2f} s > budget {budget_s:g} s"
                    stopped = (SKIP_TIME, f"stopped: {res}² was over the {budget_s:g} s budget")
                else:
                    last = (pixels, fields["median_ms"] / 1e3)
            finally:
                del workload
                _release(config.device, collect=result.status in (OOM, ERROR))
            shown = f"{result.median_ms:10.2f} ms" if result.median_ms is not None else ""
            log(f"  {method.name:<20} {res:>6}²  {result.status:<11} {shown} {result.note}".rstrip())
    return results
