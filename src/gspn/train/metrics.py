"""The JSON-lines metrics log and its PNG plot."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write

__all__ = ["append_metrics", "plot_metrics", "read_metrics", "truncate_metrics"]


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file (an empty list when it does not exist)."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def append_metrics(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one JSON record as a line."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def truncate_metrics(path: str | os.PathLike[str], before_epoch: int) -> None:
    """Keep only the epoch records with ``epoch < before_epoch`` (used on resume)."""
    if not Path(path).exists():
        return
    keep = [r for r in read_metrics(path) if r.get("epoch", -1) < before_epoch]
    text = "".join(json.dumps(r) + "\n" for r in keep).encode()
    atomic_write(path, lambda f: f.write(text))


def plot_metrics(jsonl: str | os.PathLike[str], png: str | os.PathLike[str]) -> bool:
    """Draw loss and accuracy curves from ``jsonl`` to ``png``.

    Returns ``False`` (with a warning) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn(
            "matplotlib is not installed (pip install 'gspn[plot]'); skipping the plot", stacklevel=2
        )
        return False
    recs = read_metrics(jsonl)
    if not recs:
        return False
    ep = [r["epoch"] + 1 for r in recs]
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (
        ("train_loss", "train (label-smoothed)"),
        ("val_loss", "val"),
        ("ema_val_loss", "val (EMA)"),
    ):
        if all(key in r for r in recs):
            ax_l.plot(ep, [r[key] for r in recs], marker=".", label=label)
    for key, label in (("train_acc", "train"), ("val_acc", "val"), ("ema_val_acc", "val (EMA)")):
        if all(key in r for r in recs):
            ax_a.plot(ep, [100 * r[key] for r in recs], marker=".", label=label)
    ax_l.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_a.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_l, ax_a):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(png, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return True
