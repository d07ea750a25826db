"""The JSON-lines metrics log (``metrics.jsonl``) and its PNG plot, shared by every trainer."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .state import atomic_write

__all__ = ["CLASSIFIER_PANELS", "Panel", "append_metrics", "plot_metrics", "read_metrics", "truncate_metrics"]


def json_safe(obj: Any) -> Any:
    """``obj`` with every dict key a string and every value JSON can hold: lists for tuples, ``str()``
    for anything else (paths, dtypes, devices), recursively."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file (an empty list when it does not exist).

    A last line cut short by a killed writer (no newline, not valid JSON) is ignored.
    """
    p = Path(path)
    if not p.exists():
        return []
    lines = [line for line in p.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
    return records


def append_metrics(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one JSON record as a line."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def truncate_metrics(path: str | os.PathLike[str], last: int, key: str = "epoch") -> None:
    """Keep only the records with ``record[key] <= last`` (and those without ``key``), atomically.

    Used on resume: ``last`` is the checkpoint's epoch (classifier) or step (DiT, ``key="step"``), and
    the records written after that checkpoint are dropped because the run redoes them.
    """
    if not Path(path).exists():
        return
    keep = [r for r in read_metrics(path) if r.get(key, last) <= last]
    text = "".join(json.dumps(r) + "\n" for r in keep).encode()
    atomic_write(path, lambda f: f.write(text))


@dataclass(frozen=True)
class Panel:
    """One subplot of :func:`plot_metrics`: the curves ``(record key, legend label)`` on one y-axis.

    Each value is multiplied by ``scale`` (100 draws fractions as percentages); ``log`` makes the
    y-axis logarithmic.
    """

    title: str
    ylabel: str
    curves: tuple[tuple[str, str], ...]
    scale: float = 1.0
    log: bool = False


CLASSIFIER_PANELS = (
    Panel(
        "loss",
        "loss",
        (("train_loss", "train (label-smoothed)"), ("val_loss", "val"), ("ema_val_loss", "val (EMA)")),
    ),
    Panel(
        "accuracy",
        "accuracy (%)",
        (("train_acc", "train"), ("val_acc", "val"), ("ema_val_acc", "val (EMA)")),
        scale=100.0,
    ),
)
"""The per-epoch loss and accuracy curves of ``gspn train`` (``metrics.png``)."""


def plot_metrics(
    jsonl: str | os.PathLike[str],
    png: str | os.PathLike[str],
    panels: Sequence[Panel] = CLASSIFIER_PANELS,
    x: str = "epoch",
    x_offset: int = 1,
) -> bool:
    """Draw ``panels`` side by side from ``jsonl`` to ``png`` (atomically), against ``record[x] + x_offset``.

    The defaults plot the classifier's records against the number of epochs done (``epoch`` is
    0-based); a curve takes the records that hold its key. Returns ``False`` when there is nothing to
    plot, or (with a warning) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed (pip install 'gspn[plot]'); skipping the plot", stacklevel=2)
        return False
    recs = [r for r in read_metrics(jsonl) if x in r]
    if not recs:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for key, label in panel.curves:
            pts = [(r[x] + x_offset, panel.scale * r[key]) for r in recs if key in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=".", label=label)
        ax.set(xlabel=x, ylabel=panel.ylabel, title=panel.title)
        if panel.log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(png, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return True
