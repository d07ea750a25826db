"""The training loop behind ``gspn train`` and the evaluation behind ``gspn eval``.

One process trains on one device; under ``torchrun`` every process does so on its shard of the data
(:class:`~torch.utils.data.distributed.DistributedSampler`) and DDP averages the gradients. Rank 0 alone
writes checkpoints, metrics, the plot and the progress bar.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from .._files import claim_run_dir
from ..datasets import build_data
from ..training_utils import (
    STATE_FORMAT,
    DistContext,
    all_gather_objects,
    all_reduce_sum,
    append_metrics,
    atomic_write,
    autocast_dtype,
    build_ema,
    build_lr_scheduler,
    capture_rng,
    cleanup_distributed,
    derive_seed,
    evaluate,
    init_distributed,
    json_safe,
    load_ema_weights,
    load_state,
    param_groups,
    plot_metrics,
    read_metrics,
    restore_rank_rng,
    save_state,
    seed_all,
    sync_buffers,
    train_one_epoch,
    training_state,
    truncate_metrics,
    weights_digest,
)
from ..training_utils.schedule import schedule_fn
from .factory import build_model, model_default_cfg

__all__ = ["TrainConfig", "evaluate", "evaluate_checkpoint", "run", "train", "weights_digest"]

CHECKPOINT_FORMAT = STATE_FORMAT  # the name this module gave the kit's one training-state format
_REFRESH_EVERY = 10  # progress-bar refresh interval, in optimizer steps


@dataclass
class TrainConfig:
    """Everything one training run depends on. ``gspn train --help`` documents each field."""

    model: str = "gspn_micro"
    model_args: dict[str, Any] = field(default_factory=dict)
    data: str = "digits"
    output: str = "runs/train"
    img_size: int | None = None
    in_chans: int = 3
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    clip_grad: float | None = 1.0
    ema_decay: float | None = None
    amp: str = "auto"
    workers: int = 2
    seed: int = 0
    device: str = "auto"
    dist_backend: str | None = None
    resume: str | None = None
    overwrite: bool = False
    stop_after_epochs: int | None = None
    train_limit: int | None = None
    val_limit: int | None = None
    hflip: float | None = None
    crop_scale: tuple[float, float] | None = None
    crop_pct: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    progress: bool = True
    plot: bool = True
    verbose: bool = True


# ----------------------------------------------------------------------------------------------- helpers


def _cosine_with_warmup(total: int, warmup: int, base_lr: float, min_lr: float) -> Callable[[int], float]:
    """LR multiplier per optimizer step: linear warm-up from ~0, then cosine down to ``min_lr``
    (:func:`gspn.training_utils.schedule.schedule_fn`)."""
    return schedule_fn("cosine", total, warmup, min_lr / base_lr if base_lr > 0 else 0.0)


def _log(ctx: DistContext, cfg_verbose: bool, msg: str) -> None:
    if ctx.is_main and cfg_verbose:
        print(msg, flush=True)


def _shard(ds: Dataset, ctx: DistContext) -> Dataset:
    """This rank's slice of an evaluation set: every sample on exactly one rank, no padding."""
    if not ctx.distributed:
        return ds
    return Subset(ds, list(range(ctx.rank, len(ds), ctx.world_size)))  # type: ignore[arg-type]


def _loader(ds: Dataset, batch: int, workers: int, device: torch.device, **kw: Any) -> DataLoader:
    return DataLoader(
        ds,
        batch_size=batch,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        **kw,
    )


# ----------------------------------------------------------------------------------------------- train


RUN_FILES = (
    "last.pt",
    "best.pt",
    "metrics.jsonl",
    "metrics.png",
    "summary.json",
    "model.safetensors",
    "model_ema.safetensors",
)
"""The files a ``gspn train`` run writes in its folder (their presence marks the folder as a run's)."""


def run(config: TrainConfig) -> dict[str, Any]:
    """The classification recipe's entry point (``gspn train``): :func:`train` of ``config``."""
    return train(config)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train according to ``cfg``; return the run summary (also written to ``<output>/summary.json``).

    Works the same in a single process and under ``torchrun`` (one process per device). The output
    folder must not hold another run unless ``cfg.resume`` continues it or ``cfg.overwrite`` replaces it;
    rank 0 locks it for the duration of the run.

    Writes are ordered so that a kill at any point leaves a consistent folder: each epoch writes
    ``last.pt`` first (it carries the epoch's metrics record), then ``best.pt``, then the metrics line and
    plot; a resume repairs whatever of the latter a kill left out.
    """
    _validate(cfg)
    ctx = init_distributed(cfg.device, cfg.dist_backend)
    ok = False
    run_dir = None
    try:
        if ctx.is_main:
            run_dir = claim_run_dir(cfg.output, RUN_FILES, resume=bool(cfg.resume), overwrite=cfg.overwrite)
        summary = _train(cfg, ctx)
        ok = True
        return summary
    finally:
        if run_dir is not None:
            run_dir.release()
        cleanup_distributed(ok)


def _validate(cfg: TrainConfig) -> None:
    """Reject settings that cannot train, before any work (one ``ValueError`` naming the option)."""
    positive = {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "in_chans": cfg.in_chans}
    positive.update(
        {
            k: v
            for k, v in (
                ("img_size", cfg.img_size),
                ("train_limit", cfg.train_limit),
                ("val_limit", cfg.val_limit),
                ("stop_after_epochs", cfg.stop_after_epochs),
            )
            if v is not None
        }
    )
    flags = {"img_size": "--image-size", "in_chans": "--in-channels"}  # the flags, not the field names
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            flag = flags.get(name, "--" + name.replace("_", "-"))
            raise ValueError(f"{flag} must be a positive integer, got {value!r}")
    for name in ("lr", "min_lr", "weight_decay", "warmup_epochs", "label_smoothing"):
        value = getattr(cfg, name)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value!r}")
    if cfg.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {cfg.workers}")
    if not 0 <= cfg.label_smoothing < 1:
        raise ValueError(f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}")
    if cfg.clip_grad is not None and not (math.isfinite(cfg.clip_grad) and cfg.clip_grad >= 0):
        raise ValueError(f"--clip-grad must be a finite number >= 0, got {cfg.clip_grad}")
    if cfg.ema_decay is not None and not 0 <= cfg.ema_decay < 1:
        raise ValueError(f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    for name, values in (("mean", cfg.mean), ("std", cfg.std)):
        if values is None:
            continue
        if len(values) not in (1, cfg.in_chans) or not all(math.isfinite(v) for v in values):
            raise ValueError(f"--{name} takes 1 or --in-channels ({cfg.in_chans}) finite numbers, got {values!r}")
    if cfg.std is not None and min(cfg.std) <= 0:
        raise ValueError(f"--std must be > 0, got {cfg.std!r}")
    if cfg.crop_scale is not None:
        lo, hi = cfg.crop_scale
        if not (0 <= lo <= hi <= 1 and hi > 0):
            raise ValueError(f"--crop-scale LO,HI must satisfy 0 <= LO <= HI <= 1, HI > 0, got {lo},{hi}")
    if cfg.hflip is not None and not 0 <= cfg.hflip <= 1:
        raise ValueError(f"--hflip must be a probability in [0, 1], got {cfg.hflip}")
    if cfg.crop_pct is not None and not (math.isfinite(cfg.crop_pct) and cfg.crop_pct > 0):
        raise ValueError(f"--crop-pct must be a finite number > 0, got {cfg.crop_pct}")


def _build_model(cfg: TrainConfig, **kwargs: Any) -> nn.Module:
    """``build_model(cfg.model, **kwargs, **cfg.model_args)``; a constructor's ``TypeError`` (an unknown
    or ill-typed ``--model-arg``) becomes a ``ValueError`` naming the flag: one error line, not a traceback."""
    try:
        return build_model(cfg.model, **kwargs, **cfg.model_args)
    except TypeError as exc:
        raise ValueError(f"--model-arg {cfg.model_args} for {cfg.model}: {exc}") from exc


def _repair_after_kill(out: Path, ckpt: dict[str, Any], resume_path: Path, plot: bool) -> None:
    """Bring ``best.pt`` and ``metrics.jsonl`` in line with the ``last.pt`` being resumed.

    A kill after ``last.pt`` of epoch E was written can leave ``best.pt`` one improvement behind and
    the metrics line of epoch E unwritten; both follow from ``last.pt`` (when epoch E was the best,
    ``last.pt`` *is* the best state). Records of epochs after E (their ``last.pt`` never landed) are dropped.
    """
    epoch = ckpt["epoch"]
    metrics = out / "metrics.jsonl"
    truncate_metrics(metrics, epoch)
    record = ckpt.get("record")
    if record is not None and not any(r.get("epoch") == epoch for r in read_metrics(metrics)):
        append_metrics(metrics, record)
    best = out / "best.pt"
    if (
        ckpt.get("best_epoch") == epoch
        and resume_path.resolve() == (out / "last.pt").resolve()
        and (not best.exists() or load_state(best).get("epoch") != epoch)
    ):
        with resume_path.open("rb") as src:
            atomic_write(best, lambda f: shutil.copyfileobj(src, f))
    if plot and record is not None:
        plot_metrics(metrics, out / "metrics.png")


def _resolve_resume(cfg: TrainConfig, out: Path) -> Path | None:
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        p = out / "last.pt"
        return p if p.exists() else None
    p = Path(cfg.resume)
    if not p.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {p}")
    return p


@dataclass
class _Run:
    """The objects one classification run trains (built by :func:`_setup`)."""

    model: nn.Module
    ddp_model: nn.Module
    ema: Any
    data: Any
    sampler: DistributedSampler | None
    gen: torch.Generator
    train_loader: DataLoader
    val_loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    amp_dtype: torch.dtype | None
    steps_per_epoch: int
    n_params: int


@dataclass
class _Progress:
    """The counters a checkpoint carries (restored by :func:`_restore`)."""

    start_epoch: int = 0
    step: int = 0
    best_acc: float = -1.0
    best_epoch: int = -1
    elapsed: float = 0.0
    cpu_elapsed: float = 0.0


def _load_resume(cfg: TrainConfig, ctx: DistContext, out: Path) -> tuple[Path | None, dict[str, Any] | None]:
    resume_path = _resolve_resume(cfg, out)
    seen_by_rank = all_gather_objects(str(resume_path) if resume_path else None, ctx)
    if len(set(seen_by_rank)) > 1:
        raise RuntimeError(
            f"--resume: the ranks disagree on the checkpoint to resume from ({seen_by_rank}); "
            "the output directory must be on a filesystem shared by all nodes"
        )
    ckpt = load_state(resume_path) if resume_path else None
    if ckpt is not None:
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{resume_path} is not a gspn training checkpoint")
        if ckpt["model_name"] != cfg.model or ckpt["model_args"] != cfg.model_args:
            raise ValueError(
                f"--resume: checkpoint is for model {ckpt['model_name']} {ckpt['model_args']}, "
                f"not {cfg.model} {cfg.model_args}"
            )
    return resume_path, ckpt


def _setup(cfg: TrainConfig, ctx: DistContext) -> _Run:
    """Data, model (and its DDP wrapper and EMA), loaders, optimizer, schedule; seeded as the seeding rule says."""
    dev = ctx.device
    # The model is built with the same seed on every rank (DDP also broadcasts rank 0's weights).
    seed_all(cfg.seed)
    model_cfg: dict[str, Any] = {}
    if cfg.data != "digits" and not (cfg.img_size and cfg.mean and cfg.std):
        # image folders default to the model's input size and statistics: read its default_cfg
        probe = _build_model(cfg, num_classes=2, in_chans=cfg.in_chans)
        model_cfg = model_default_cfg(probe)
        del probe
    data = build_data(
        cfg.data,
        img_size=cfg.img_size,
        in_chans=cfg.in_chans,
        mean=cfg.mean,
        std=cfg.std,
        scale=cfg.crop_scale,
        hflip=cfg.hflip,
        crop_pct=cfg.crop_pct,
        train_limit=cfg.train_limit,
        val_limit=cfg.val_limit,
        model_cfg=model_cfg,
    )
    seed_all(cfg.seed)
    model = _build_model(cfg, num_classes=data.num_classes, in_chans=data.in_chans)
    model.to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    ema = build_ema(model, cfg.ema_decay) if cfg.ema_decay else None
    ddp_model: nn.Module = model
    if ctx.distributed:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    # Per-rank data RNG: a different augmentation stream on each rank, reproducible per rank.
    rank_seed = derive_seed(cfg.seed, rank=ctx.rank)
    seed_all(rank_seed)
    gen = torch.Generator().manual_seed(rank_seed)
    sampler = (
        DistributedSampler(data.train, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.seed)
        if ctx.distributed
        else None
    )
    train_loader = _loader(
        data.train, cfg.batch_size, cfg.workers, dev, shuffle=sampler is None, sampler=sampler, generator=gen
    )
    val_loader = _loader(
        _shard(data.val, ctx), cfg.batch_size, cfg.workers, dev, generator=torch.Generator().manual_seed(0)
    )
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError("the training set is empty")
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    scheduler = build_lr_scheduler(
        optimizer,
        "cosine",
        total_steps=cfg.epochs * steps_per_epoch,
        warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
        min_lr_ratio=cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0,
    )
    amp_dtype = autocast_dtype(cfg.amp, dev)
    return _Run(
        model=model,
        ddp_model=ddp_model,
        ema=ema,
        data=data,
        sampler=sampler,
        gen=gen,
        train_loader=train_loader,
        val_loader=val_loader,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16),
        criterion=nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
        amp_dtype=amp_dtype,
        steps_per_epoch=steps_per_epoch,
        n_params=n_params,
    )


def _restore(cfg: TrainConfig, ctx: DistContext, run: _Run, ckpt: dict[str, Any]) -> _Progress:
    """Load a training state into ``run`` (weights, optimizer, schedule, scaler, EMA, RNG); its counters."""
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler") and run.scaler.is_enabled():  # None ({} in older files): no fp16 scaler then
        run.scaler.load_state_dict(ckpt["scaler"])
    if run.ema is not None:
        if ckpt.get("ema") is None:
            warnings.warn("--resume: checkpoint has no EMA; starting the EMA from the current weights", stacklevel=3)
            run.ema = build_ema(run.model, cfg.ema_decay)
        else:
            run.ema.load_state_dict(ckpt["ema"])
    rng = ckpt["rng"]
    restore_rank_rng(rng, ctx.rank, ctx.world_size, run.gen)
    return _Progress(
        start_epoch=ckpt["epoch"] + 1,
        step=ckpt["step"],
        best_acc=ckpt["best_acc"],
        best_epoch=ckpt["best_epoch"],
        elapsed=ckpt.get("elapsed_s", 0.0),
        cpu_elapsed=ckpt.get("cpu_s", 0.0),
    )


def _write_epoch(out: Path, cfg: TrainConfig, state: dict[str, Any], record: dict[str, Any], improved: bool) -> None:
    """Rank 0's files of one epoch, in kill-safe order: ``last.pt`` is the commit point; ``best.pt``
    and the metrics line follow from it (see :func:`_repair_after_kill`)."""
    save_state(out / "last.pt", state)
    if improved:
        save_state(out / "best.pt", state)
    metrics_path = out / "metrics.jsonl"
    append_metrics(metrics_path, record)
    if cfg.plot:
        plot_metrics(metrics_path, out / "metrics.png")


def _train(cfg: TrainConfig, ctx: DistContext) -> dict[str, Any]:
    out = Path(cfg.output)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    dev = ctx.device
    resume_path, ckpt = _load_resume(cfg, ctx, out)
    run = _setup(cfg, ctx)
    model, ema, data = run.model, run.ema, run.data
    prog = _Progress()
    if ckpt is not None:
        prog = _restore(cfg, ctx, run, ckpt)
        ema = run.ema
        _log(ctx, cfg.verbose, f"resumed from {resume_path} at epoch {prog.start_epoch}, step {prog.step}")
        if ctx.is_main:
            assert resume_path is not None
            _repair_after_kill(out, ckpt, resume_path, cfg.plot)
        del ckpt

    meta = {
        "model_name": cfg.model,
        "model_args": cfg.model_args,
        "num_classes": data.num_classes,
        "in_chans": data.in_chans,
        "img_size": data.img_size,
        "mean": data.mean,
        "std": data.std,
        "classes": data.classes,
        "data": data.source,
        "config": json_safe(asdict(cfg)),
    }
    _log(
        ctx,
        cfg.verbose,
        f"model {cfg.model}: {run.n_params / 1e6:.3f}M params | data {data.source}: {len(data.train)} train / "
        f"{len(data.val)} val, {data.num_classes} classes, {data.img_size}px | {ctx.world_size} process(es) "
        f"on {dev.type} | {cfg.epochs} epochs × {run.steps_per_epoch} steps",
    )

    from tqdm.auto import tqdm

    last_val: dict[str, float] = {}
    end_epoch = cfg.epochs
    if cfg.stop_after_epochs is not None:
        end_epoch = min(cfg.epochs, prog.start_epoch + cfg.stop_after_epochs)
    for epoch in range(prog.start_epoch, end_epoch):
        t0, c0 = time.perf_counter(), time.process_time()
        if run.sampler is not None:
            run.sampler.set_epoch(epoch)
        bar = tqdm(
            run.train_loader,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not (cfg.progress and ctx.is_main),
            leave=False,
            dynamic_ncols=True,
            file=sys.stderr,
        )

        def on_step(step: int, loss: torch.Tensor, bar: Any = bar) -> None:
            if step % _REFRESH_EVERY == 0 and bar.disable is False:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{run.scheduler.get_last_lr()[0]:.2e}")

        stats = train_one_epoch(
            run.ddp_model,
            bar,
            run.optimizer,
            run.criterion,
            dev,
            params_of=model,
            scheduler=run.scheduler,
            scaler=run.scaler,
            clip_grad=cfg.clip_grad,
            ema=ema,
            amp_dtype=run.amp_dtype,
            step=prog.step,
            on_step=on_step,
        )
        bar.close()
        prog.step = step = stats.step
        loss_sum, correct, seen = all_reduce_sum([stats.loss_sum.item(), float(stats.correct.item()), stats.seen], ctx)
        if not math.isfinite(loss_sum) or not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            # stop before diverged weights can overwrite a good checkpoint
            raise FloatingPointError(
                f"non-finite weights or loss after epoch {epoch + 1} (step {step}; mean training loss "
                f"{loss_sum / seen}); stopped before writing: {out} keeps the last good state "
                "(lower --lr or set --clip-grad)"
            )
        train_time = time.perf_counter() - t0
        sync_buffers(model, ctx)
        if ema is not None:
            sync_buffers(ema, ctx)
        val = evaluate(model, run.val_loader, dev, ctx, run.amp_dtype)
        ema_val = evaluate(ema.module, run.val_loader, dev, ctx, run.amp_dtype) if ema is not None else None
        prog.elapsed += time.perf_counter() - t0
        prog.cpu_elapsed += time.process_time() - c0
        score = ema_val["acc"] if ema_val is not None else val["acc"]
        improved = score > prog.best_acc
        if improved:
            prog.best_acc, prog.best_epoch = score, epoch
        record = {
            "epoch": epoch,
            "step": step,
            "lr": run.scheduler.get_last_lr()[0],
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "val_loss": val["loss"],
            "val_acc": val["acc"],
            **({"ema_val_loss": ema_val["loss"], "ema_val_acc": ema_val["acc"]} if ema_val else {}),
            "best_acc": prog.best_acc,
            "epoch_s": time.perf_counter() - t0,
            "train_imgs_per_s": seen / train_time,
            "elapsed_s": prog.elapsed,
            "cpu_s": prog.cpu_elapsed,
        }
        last_val = record
        rng_all = all_gather_objects(capture_rng(run.gen), ctx)
        if ctx.is_main:
            state = training_state(
                model=model.state_dict(),
                optimizer=run.optimizer.state_dict(),
                scheduler=run.scheduler.state_dict(),
                scaler=run.scaler.state_dict() if run.scaler.is_enabled() else None,
                ema=ema.state_dict() if ema is not None else None,
                epoch=epoch,
                step=step,
                rng=rng_all,
                **meta,
                best_acc=prog.best_acc,
                best_epoch=prog.best_epoch,
                elapsed_s=prog.elapsed,
                cpu_s=prog.cpu_elapsed,
                world_size=ctx.world_size,
                record=record,
            )
            _write_epoch(out, cfg, state, record, improved)
            ema_txt = f" | ema val {ema_val['loss']:.4f} / {100 * ema_val['acc']:.2f}%" if ema_val else ""
            _log(
                ctx,
                cfg.verbose,
                f"epoch {epoch + 1}/{cfg.epochs} | train {record['train_loss']:.4f} / "
                f"{100 * record['train_acc']:.2f}% | val {val['loss']:.4f} / {100 * val['acc']:.2f}%"
                f"{ema_txt} | "
                f"{record['epoch_s']:.1f}s",
            )
        if ctx.distributed:
            dist.barrier()
    return _finish(cfg, ctx, out, run, prog, meta, last_val)


def _finish(
    cfg: TrainConfig,
    ctx: DistContext,
    out: Path,
    run: _Run,
    prog: _Progress,
    meta: dict[str, Any],
    last_val: dict[str, Any],
) -> dict[str, Any]:
    """The run summary; rank 0 exports the weights and writes ``summary.json``."""
    digests = all_gather_objects(weights_digest(run.model), ctx)
    summary = {
        "model": cfg.model,
        "model_args": cfg.model_args,
        "params": run.n_params,
        "epochs": cfg.epochs,
        "steps": prog.step,
        "world_size": ctx.world_size,
        "best_acc": prog.best_acc,
        "best_epoch": prog.best_epoch,
        "final": last_val,
        "elapsed_s": prog.elapsed,
        "cpu_s": prog.cpu_elapsed,
        "rank_weight_digests": digests,
        "output": str(out),
    }
    if ctx.is_main:
        if len(set(digests)) > 1:
            warnings.warn("DDP ranks ended with different weights: " + ", ".join(digests), stacklevel=2)
        _export_safetensors(run.model, out / "model.safetensors", meta)
        if run.ema is not None:
            _export_safetensors(run.ema.module, out / "model_ema.safetensors", meta)
        text = json.dumps(json_safe(summary), indent=2).encode()
        atomic_write(out / "summary.json", lambda f: f.write(text))
        _log(
            ctx,
            cfg.verbose,
            f"best val acc {100 * prog.best_acc:.2f}% (epoch {prog.best_epoch + 1}); outputs in {out}",
        )
    return summary


def _export_safetensors(model: nn.Module, path: Path, meta: dict[str, Any]) -> None:
    """Final weights in the library's one weight format (:func:`gspn.models.save_checkpoint`: loads with
    :func:`gspn.models.load_model` and ``create_model(name, pretrained=path)``), plus the training data's
    setup (image size, mean/std, class names) as ``gspn.train.*`` string metadata."""
    from ..models import save_checkpoint

    md = {
        f"gspn.train.{k}": json.dumps(json_safe(meta[k]))
        for k in ("model_name", "model_args", "num_classes", "in_chans", "img_size", "mean", "std", "classes")
    }
    try:
        save_checkpoint(model, path, metadata=md)
    except RuntimeError as e:  # shared storage etc.: weights are still in the .pt checkpoint
        warnings.warn(f"safetensors export skipped: {e}", stacklevel=2)


# ----------------------------------------------------------------------------------------------- eval


#: Entries of a classification training state that evaluation reads (beyond the shared state keys).
_EVAL_KEYS = ("model_name", "model_args", "num_classes", "in_chans", "img_size", "mean", "std", "data", "config")


def evaluate_checkpoint(
    checkpoint: str | os.PathLike[str],
    data: str | None = None,
    batch_size: int = 128,
    workers: int = 2,
    use_ema: bool = False,
    device: str = "auto",
    val_limit: int | None = None,
) -> dict[str, Any]:
    """Loss and accuracy of a training checkpoint on its validation set (or on ``data``'s).

    The data are prepared as in training (image size, channels, normalisation, ``val_limit``) unless
    overridden here.
    """
    ckpt = load_state(checkpoint)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{checkpoint} is not a gspn training checkpoint")
    missing = [k for k in _EVAL_KEYS if k not in ckpt]
    if missing:  # the same state format as gspn train-dit / distill: their files lack the data setup
        raise ValueError(
            f"{checkpoint} is not a classifier's training checkpoint of `gspn train` (it holds "
            f"{ckpt.get('model_name', 'no model name')!r}, without {', '.join(missing)})"
        )
    dev = torch.device(
        "cuda" if (device == "auto" and torch.cuda.is_available()) else ("cpu" if device == "auto" else device)
    )
    model = build_model(
        ckpt["model_name"], num_classes=ckpt["num_classes"], in_chans=ckpt["in_chans"], **ckpt["model_args"]
    )
    if use_ema:
        if ckpt.get("ema") is None:
            raise ValueError(f"{checkpoint} has no EMA weights (train with --ema-decay)")
        load_ema_weights(model, ckpt["ema"])
    else:
        model.load_state_dict(ckpt["model"])
    model.to(dev)
    bundle = build_data(
        data or ckpt["data"],
        img_size=ckpt["img_size"],
        in_chans=ckpt["in_chans"],
        mean=ckpt["mean"],
        std=ckpt["std"],
        crop_pct=ckpt["config"].get("crop_pct"),
        val_limit=val_limit if val_limit is not None else ckpt["config"].get("val_limit"),
    )
    if bundle.num_classes != ckpt["num_classes"]:
        raise ValueError(f"the data has {bundle.num_classes} classes, the checkpoint {ckpt['num_classes']}")
    loader = _loader(bundle.val, batch_size, workers, dev)
    res = evaluate(model, loader, dev)
    return {
        "checkpoint": str(checkpoint),
        "model": ckpt["model_name"],
        "epoch": ckpt["epoch"],
        "ema": use_ema,
        "data": bundle.source,
        "val_loss": res["loss"],
        "val_acc": res["acc"],
        "n": res["n"],
    }
