"""Scaling-exponent fits, attention/GSPN ratios, tables and ``results.json`` for ``gspn bench``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .timing import OK, Result

__all__ = ["exponents", "fit_exponent", "format_table", "ratios", "write_json"]

GSPN_METHODS = ("gspn-global", "gspn-local")

_SHORT_STATUS = {
    "absent": "absent",
    "skip:memory": "skip:mem",
    "skip:time": "skip:time",
    "over-budget": ">budget",
    "oom": "OOM",
    "error": "error",
}


def fit_exponent(pixels: Sequence[float], times: Sequence[float], skip_smallest: int = 1) -> float | None:
    """Least-squares slope of ``log(time)`` against ``log(pixels)``.

    The ``skip_smallest`` smallest sizes, where fixed per-call overheads dominate, are left out as
    long as at least two points remain; with fewer than two points the slope is ``None``.
    """
    points = sorted((float(p), float(t)) for p, t in zip(pixels, times, strict=True) if p > 0 and t > 0)
    if len(points) < 2:
        return None
    if len(points) - skip_smallest >= 2:
        points = points[skip_smallest:]
    x = np.log([p for p, _ in points])
    y = np.log([t for _, t in points])
    if np.ptp(x) == 0:
        return None
    slope, _intercept = np.polyfit(x, y, 1)
    return float(slope)


def _by_method(results: Sequence[Result]) -> dict[str, list[Result]]:
    grouped: dict[str, list[Result]] = {}
    for r in results:
        grouped.setdefault(r.method, []).append(r)
    return grouped


def exponents(results: Sequence[Result], skip_smallest: int = 1) -> dict[str, float | None]:
    """Fitted time exponent in pixels of every method, over its ``ok`` sizes (see :func:`fit_exponent`)."""
    fits = {}
    for method, rows in _by_method(results).items():
        ok = [r for r in rows if r.status == OK and r.median_ms]
        fits[method] = fit_exponent([r.pixels for r in ok], [r.median_ms for r in ok], skip_smallest)
    return fits


def ratios(results: Sequence[Result]) -> list[dict]:
    """``time(method) / time(GSPN)`` at the largest resolution both measured, for every method that is
    not a GSPN variant (``gspn-*``), against ``gspn-global`` and ``gspn-local``.

    Returns dicts ``{"method", "gspn", "resolution", "ratio", "method_ms", "gspn_ms"}``.
    """
    grouped = _by_method(results)
    out = []
    for gspn in GSPN_METHODS:
        gspn_ok = {r.resolution: r for r in grouped.get(gspn, []) if r.status == OK}
        for method, rows in grouped.items():
            if method.startswith("gspn"):
                continue
            common = [r for r in rows if r.status == OK and r.resolution in gspn_ok]
            if not common:
                continue
            best = max(common, key=lambda r: r.resolution)
            g = gspn_ok[best.resolution]
            out.append(
                {
                    "method": method,
                    "gspn": gspn,
                    "resolution": best.resolution,
                    "ratio": best.median_ms / g.median_ms,
                    "method_ms": best.median_ms,
                    "gspn_ms": g.median_ms,
                }
            )
    return out


def _cell(r: Result, what: str) -> str:
    if r.status != OK:
        if r.status == "over-budget" and what == "time" and r.median_ms is not None:
            return f">{_fmt_ms(r.median_ms)}"
        return _SHORT_STATUS.get(r.status, r.status)
    if what == "time":
        return _fmt_ms(r.median_ms)
    if r.peak_mem_bytes is None:  # not measured (budget spent, or memory off): the estimate
        return "?" if r.est_mem_bytes is None else f"~{r.est_mem_bytes / 2**20:.1f}"
    return f"{r.peak_mem_bytes / 2**20:.1f}"


def _fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "?"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    return f"{ms:.2f}"


def format_table(
    results: Sequence[Result], what: str = "time", markdown: bool = False, fits: dict | None = None
) -> str:
    """Methods × resolutions table of median time in ms (``what="time"``) or peak extra memory in MiB
    (``what="memory"``; ``~x`` marks the analytic estimate where the peak was not measured).

    Cells of configurations that did not run show their status (``skip:mem``, ``skip:time``,
    ``>budget``, ``OOM``, ``error``, ``absent``). With ``fits`` a last column gives the exponent.
    """
    resolutions = sorted({r.resolution for r in results})
    header = ["method"] + [f"{res}²" for res in resolutions]
    if fits is not None:
        header.append("exponent")
    rows = []
    for method, group in _by_method(results).items():
        cells = {r.resolution: _cell(r, what) for r in group}
        row = [group[0].label] + [cells.get(res, "") for res in resolutions]
        if fits is not None:
            fit = fits.get(method)
            row.append("" if fit is None else f"{fit:.2f}")
        rows.append(row)
    if markdown:
        rule = "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"
        lines = ["| " + " | ".join(header) + " |", rule]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    fmt = [lambda s, w=widths[0]: s.ljust(w)] + [lambda s, w=w: s.rjust(w) for w in widths[1:]]
    return "\n".join("  ".join(f(c) for f, c in zip(fmt, row, strict=True)) for row in [header, *rows])


def write_json(path: Path, payload: dict) -> Path:
    """Write ``payload`` (the run's settings, environment, results, fits and ratios) as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path
