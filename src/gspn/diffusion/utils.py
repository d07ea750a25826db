"""Small, self-contained training helpers: EMA, atomic checkpoints, RNG state, metrics, DDP.

These mirror what a trainer needs for *exact* resume: a checkpoint holds the model, EMA,
optimizer, step counter and every RNG state (python, numpy, torch CPU, CUDA), and is written to a
temporary file and renamed (``os.replace``) so a crash never leaves a half-written file.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..train.distributed import cleanup_distributed
from ..train.distributed import init_distributed as _init_distributed

__all__ = [
    "EMA",
    "MetricsLogger",
    "barrier_and_destroy",
    "init_distributed",
    "is_main_process",
    "plot_metrics",
    "unwrap",
]


class EMA:
    """Exponential moving average of a model's parameters (buffers are copied).

    ``ema = decay·ema + (1 − decay)·param`` after every optimizer step. The shadow model is a
    frozen deep copy kept in eval mode.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        self.decay = decay
        self.model = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        src = unwrap(model)
        ema_params = dict(self.model.named_parameters())
        for name, p in src.named_parameters():
            ema_params[name].lerp_(p.detach(), 1.0 - self.decay)
        ema_buffers = dict(self.model.named_buffers())
        for name, b in src.named_buffers():
            ema_buffers[name].copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


class MetricsLogger:
    """Append one JSON object per line to ``path`` (main process only)."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, **record: Any) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records with ``step > step`` (after resuming from an older checkpoint)."""
        if not (self.enabled and self.path.exists()):
            return
        keep = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        self.path.write_text("".join(line + "\n" for line in keep))


def plot_metrics(
    jsonl: str | os.PathLike, out_png: str | os.PathLike, keys: tuple[str, ...] = ("loss", "mse")
) -> bool:
    """Plot ``keys`` against ``step`` from a metrics file to a PNG; ``False`` if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        pts = [(r["step"], r[key]) for r in records if key in r]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, label=key)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return True


def init_distributed() -> tuple[int, int, int]:
    """Join the ``torchrun`` process group if any (NCCL on CUDA, gloo otherwise); ``(rank, world, local_rank)``.

    A thin adapter over :func:`gspn.train.distributed.init_distributed`, which owns the set-up.
    """
    ctx = _init_distributed()
    return ctx.rank, ctx.world_size, ctx.local_rank


def is_main_process() -> bool:
    """Rank 0, or not distributed."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier_and_destroy() -> None:
    """``barrier()`` then ``destroy_process_group()`` (without the barrier gloo exits are flaky)."""
    cleanup_distributed(ok=True)
