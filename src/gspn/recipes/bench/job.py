"""One ``gspn bench`` job: settings → timings → report (:func:`run`), or a report of earlier timings.

For square inputs of growing resolution it times one token-mixing layer of each method (see
:mod:`.methods` for exactly what is timed), skips configurations that would not fit in memory or in the
time budget (:mod:`.timing`), fits each method's scaling exponent in pixels, prints a table and the
attention/GSPN time ratio, and writes ``results.json``, ``table.md`` and ``scaling.png``.

Not a :class:`gspn.training_utils.Recipe`: there is no state to save or resume, no loss to guard and no
run folder to claim (a benchmark rewrites its report in place), so it does not go through the runner.
Everything is checked (:func:`.config.resolve_settings`) before anything is measured or written.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from ...training_utils import ConfigError
from .config import BenchConfig, resolve_settings
from .methods import LayerConfig, iter_methods
from .report import exponents, format_table, ratios, write_json
from .timing import Result, benchmark

__all__ = ["run"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(config: BenchConfig) -> dict[str, Any]:
    """Run the benchmark of ``config`` (or, with ``config.replot``, re-report an earlier one) and return
    what ``results.json`` holds: the settings, the environment, every measurement, the fits and ratios.

    Raises:
        ConfigError: a field the benchmark cannot run with; nothing has been measured or written then.
        OSError: ``config.replot`` cannot be read, or ``config.output_dir`` cannot be written.
    """
    if config.replot is not None:
        return _replot(config)
    s = resolve_settings(config)
    device = torch.device(s["device"])
    scan_backend = _scan_backend(config.gspn_backend, device)
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _run(config, s, device, scan_backend)
    finally:
        torch.set_num_threads(threads)


def _run(config: BenchConfig, s: dict, device: torch.device, scan_backend: str) -> dict[str, Any]:
    layer = LayerConfig(
        device=device,
        dtype=_DTYPES[s["dtype"]],
        channels=s["channels"],
        heads=s["heads"],
        batch=s["batch"],
        d_state=config.d_state,
        local_chunk=config.local_chunk,
        backward=config.backward,
        gspn_backend=config.gspn_backend,
    )
    methods = list(iter_methods(config.methods))
    mode = "forward+backward" if config.backward else "forward"
    head = (
        f"{_device_name(device)} ({s['device']}, {torch.get_num_threads()} threads), {s['dtype']}, "
        f"B={s['batch']} C={s['channels']} heads={s['heads']}, {mode}"
    )
    print(f"gspn bench: {head}")
    print(f"  GSPN scan backend: {scan_backend}; GSPN local chunk {config.local_chunk}, d_state {config.d_state}")
    load = _load_average()
    threads = torch.get_num_threads()
    if device.type == "cpu" and load is not None and threads > 1 and load > (os.cpu_count() or 1):
        print(
            f"  warning: load average {load:.1f} on {os.cpu_count()} CPUs: with {threads} threads a "
            "parallel region can wait for a descheduled thread and times become erratic; "
            "consider running on one thread"
        )
    print(
        f"  sides {', '.join(map(str, s['resolutions']))}; budget {s['budget_seconds']:g} s per "
        f"configuration; median of up to {s['repeats']} calls after 1 warm-up"
    )
    limit = None if config.memory_limit_gb is None else int(config.memory_limit_gb * 2**30)
    results = benchmark(
        layer,
        methods,
        s["resolutions"],
        budget_s=s["budget_seconds"],
        repeats=s["repeats"],
        memory_limit_bytes=limit,
        measure_memory=config.memory,
        log=None if config.quiet else print,
    )
    payload = {
        "gspn_version": _gspn_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "title": head,
        "environment": {
            "device": s["device"],
            "device_name": _device_name(device),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_average_1min": load,
        },
        "settings": {
            **s,
            "backward": config.backward,
            "d_state": config.d_state,
            "local_chunk": config.local_chunk,
            "gspn_backend": config.gspn_backend,
            "gspn_backend_resolved": scan_backend,
            "methods": [m.name for m in methods],
            "no_memory": not config.memory,
        },
        "timed": {m.name: m.label for m in methods},
        "results": [r.to_dict() for r in results],
    }
    return _report(payload, results, config)


def _replot(config: BenchConfig) -> dict[str, Any]:
    """Re-render tables, fits, ratios and the plot of an earlier ``results.json`` into ``output_dir``."""
    path = Path(config.replot)
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError("replot", f"{path} is not a results.json ({exc})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("results"), list):
        raise ConfigError("replot", f"{path} is not a results.json of gspn bench (no list of results)")
    fields = set(Result.__dataclass_fields__)
    results = [Result(**{k: v for k, v in r.items() if k in fields}) for r in payload["results"]]
    payload.setdefault("title", f"{payload.get('environment', {}).get('device_name', '')}")
    print(f"gspn bench: re-reporting {path} ({payload['title']})")
    return _report(payload, results, config)


def _report(payload: dict, results: list[Result], config: BenchConfig) -> dict[str, Any]:
    """Print the tables and ratios, and write ``results.json``, ``table.md`` and ``scaling.png``."""
    from .plot import plot_results

    head = payload["title"]
    fits = exponents(results, skip_smallest=config.fit_skip)
    pairs = ratios(results)
    measured_memory = not payload["settings"].get("no_memory", False)
    print(f"\ntime per call, ms (median) — {head}")
    print(format_table(results, "time", fits=fits))
    if measured_memory:
        cuda = str(payload["settings"].get("device", "")).startswith("cuda")
        mem = "cuda.max_memory_allocated" if cuda else "torch.profiler tracked allocations"
        print(
            f"\npeak extra memory during one call, MiB ({mem}; excludes parameters and input; "
            "~ = analytic estimate, not measured)"
        )
        print(format_table(results, "memory"))
    if pairs:
        print("\ntime ratio at the largest resolution both ran:")
        for p in pairs:
            print(
                f"  {p['method']:<20} / {p['gspn']:<11} at {p['resolution']}²: {p['ratio']:8.2f}x "
                f"({p['method_ms']:.2f} ms vs {p['gspn_ms']:.2f} ms)"
            )

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "fit_skip": config.fit_skip, "exponents": fits, "ratios": pairs}
    json_path = write_json(out / "results.json", payload)
    md_path = out / "table.md"
    time_md = format_table(results, "time", markdown=True, fits=fits)
    memory_md = format_table(results, "memory", markdown=True)
    md_path.write_text(
        f"{head}\n\ntime per call, ms (median)\n\n{time_md}\n\npeak extra memory during one call, MiB\n\n{memory_md}\n"
    )
    written = [json_path, md_path]
    if config.plot:
        png = plot_results(results, out / "scaling.png", fits=fits, title=head)
        if png is not None:
            written.append(png)
    print(f"\nwrote {', '.join(str(p) for p in written)}")
    return payload


def _load_average() -> float | None:
    """1-minute load average of the machine (``None`` where the OS does not report one)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _scan_backend(name: str, device: torch.device) -> str:
    """Name of the scan backend ``name`` resolves to on ``device``.

    Raises:
        ConfigError: ``name`` is not a backend, or cannot run on ``device``.
    """
    from ...ops.backends import resolve_backend

    try:
        module = resolve_backend(name, device)
    except ValueError as exc:  # not a backend name
        raise ConfigError("gspn_backend", f"is not a scan backend: {exc}") from None
    except RuntimeError as exc:  # a backend named explicitly that cannot run here: GSPN would not be timed
        raise ConfigError("gspn_backend", f"{name!r} cannot run on {device.type}: {exc}") from None
    resolved = module.__name__.rsplit(".", 1)[-1].lstrip("_")
    if resolved == "reference":
        resolved += " (slow pure-PyTorch fallback)"
    return resolved


def _gspn_version() -> str:
    from ... import __version__

    return __version__
