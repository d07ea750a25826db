"""Log-log plot of time against pixels for ``gspn bench`` (needs the optional ``matplotlib``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .timing import OK, OVER_BUDGET, Result

__all__ = ["plot_results"]

_STYLE = {
    "gspn-global": ("tab:red", "o", "-"),
    "gspn-local": ("tab:orange", "o", "-"),
    "gspn-global-unfused": ("tab:red", "v", "--"),
    "attention-math": ("tab:blue", "s", "-"),
    "attention-flash": ("tab:cyan", "s", "--"),
    "attention-efficient": ("tab:purple", "s", ":"),
    "linear-attention": ("tab:green", "^", "-"),
    "mamba": ("tab:brown", "D", "-"),
    "gspn-scan-global": ("tab:red", "x", ":"),
    "gspn-scan-local": ("tab:orange", "x", ":"),
}


def plot_results(
    results: Sequence[Result],
    path: str | Path,
    *,
    fits: dict[str, float | None] | None = None,
    title: str = "",
) -> Path | None:
    """Save a log-log plot of median time (ms) vs pixels, one line per method, and return its path.

    Sizes that ran over the budget are drawn as hollow markers (not part of the fit). Returns
    ``None`` (after printing why) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'gspn[plot]')")
        return None
    fits = fits or {}
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    methods: dict[str, list[Result]] = {}
    for r in results:
        methods.setdefault(r.method, []).append(r)
    ticks = sorted({r.resolution for r in results})
    for method, rows in methods.items():
        color, marker, line = _STYLE.get(method, (None, "o", "-"))
        ok = sorted((r for r in rows if r.status == OK), key=lambda r: r.pixels)
        over = [r for r in rows if r.status == OVER_BUDGET and r.median_ms]
        if not ok and not over:
            continue
        fit = fits.get(method)
        label = rows[0].label + (f"  (∝ N^{fit:.2f})" if fit is not None else "")
        if ok:
            ax.plot(
                [r.pixels for r in ok],
                [r.median_ms for r in ok],
                marker=marker,
                linestyle=line,
                color=color,
                label=label,
            )
        if over:
            ax.plot(
                [r.pixels for r in over],
                [r.median_ms for r in over],
                marker=marker,
                linestyle="none",
                markerfacecolor="none",
                color=color,
                label=None if ok else label,
            )
    absent = sorted({r.label for r in results if r.status == "absent"})
    if absent:
        fig.text(0.01, 0.01, "not available here: " + ", ".join(absent), fontsize=7, color="gray")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks([t * t for t in ticks], [f"{t}²" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("input resolution (pixels = tokens)")
    ax.set_ylabel("time per call (ms, median)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.04 if absent else 0, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
