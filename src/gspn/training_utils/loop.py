"""Loop pieces the recipes share: precision, parameter groups, one supervised epoch, evaluation,
finiteness checks and a weights digest."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .distributed import DistContext, all_reduce_sum

__all__ = [
    "EpochStats",
    "check_finite",
    "evaluate",
    "nonfinite_parameters",
    "param_groups",
    "sync_buffers",
    "train_one_epoch",
    "weights_digest",
]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices and kernels only; none on biases, norm scales, embeddings of rank ≤ 1."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def nonfinite_parameters(model: nn.Module) -> list[str]:
    """Names of ``model``'s parameters that hold a NaN or an infinity (one device sync per tensor)."""
    return [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]


def check_finite(model: nn.Module, step: int, what: str = "weights") -> None:
    """Raise ``FloatingPointError`` if any parameter of ``model`` is NaN or infinite (before any write)."""
    bad = nonfinite_parameters(model)
    if bad:
        raise FloatingPointError(
            f"non-finite {what} at step {step} ({len(bad)} tensors, e.g. {bad[0]}); stopped before writing: "
            "the run folder keeps the last good state (lower `lr`, or `clip_grad`)"
        )


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over the model's parameters and buffers (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def sync_buffers(model: nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) to every rank so evaluation and checkpoints agree."""
    if ctx.distributed:
        for b in model.buffers():
            dist.broadcast(b.data, src=0)


@dataclass
class EpochStats:
    """What :func:`train_one_epoch` measured, summed over this rank's batches (tensors on the device)."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    seen: int
    step: int


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
    *,
    params_of: nn.Module | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    clip_grad: float | None = None,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
    amp_dtype: torch.dtype | None = None,
    step: int = 0,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> EpochStats:
    """One pass of supervised training over ``batches`` of ``(inputs, targets)``.

    ``model`` is what runs forward (a ``DistributedDataParallel`` wrapper averages the gradients);
    ``params_of`` is the bare model whose parameters are clipped and averaged into ``ema`` (default
    ``model``). Per step: autocast forward, ``criterion(logits.float(), y)``, scaled backward, optional
    clipping, optimizer, scaler, scheduler and EMA updates; ``on_step(step, loss)`` after each.
    Running sums stay on the device (no host sync per step); ``correct`` counts top-1 hits of 2-D outputs.
    """
    bare = params_of if params_of is not None else model
    scaler = scaler if scaler is not None else torch.amp.GradScaler("cuda", enabled=False)
    model.train()
    loss_acc = torch.zeros((), dtype=torch.float64, device=device)
    correct_acc = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x)
            loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip_grad:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(bare.parameters(), clip_grad)
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        step += 1
        if ema is not None:
            ema.update_parameters(bare)
        bs = y.numel()
        loss_acc += loss.detach().double() * bs
        if logits.ndim == 2:
            correct_acc += (logits.detach().argmax(-1) == y).sum()
        seen += bs
        if on_step is not None:
            on_step(step, loss)
    return EpochStats(loss_sum=loss_acc, correct=correct_acc, seen=seen, step=step)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    ctx: DistContext | None = None,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy of ``model`` over ``loader`` (summed over ranks)."""
    ctx = ctx or DistContext(device=device)
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0.0, 0.0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        n += y.numel()
    model.train(was_training)
    loss_sum, correct, n = all_reduce_sum([loss_sum, correct, n], ctx)
    return {"loss": loss_sum / max(n, 1), "acc": correct / max(n, 1), "n": int(n)}
