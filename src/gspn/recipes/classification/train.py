"""The classification recipe behind ``gspn train``: its config and its maths, on the kit's runner.

One process trains on one device; under ``torchrun`` every process does so on its shard of the data
(:class:`~torch.utils.data.distributed.DistributedSampler`) and DDP averages the gradients. AdamW,
cosine schedule with warm-up, label smoothing, gradient clipping, AMP on CUDA, optional EMA. The runner
(:func:`gspn.training_utils.run`) owns the folder, resume, the loop, the non-finite guard, the metrics log
and ``last.pt``; this module adds ``best.pt`` (the state of the best validation epoch), the metrics plot
and the exported ``model.safetensors`` / ``model_ema.safetensors``.

Writes are ordered so that a kill at any point leaves a consistent folder: each epoch writes ``last.pt``
first (it carries the epoch's metrics record), then the metrics line, ``best.pt`` and the plot; a resume
repairs whatever of the latter a kill left out.
"""

from __future__ import annotations

import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..._validate import check_int, check_number
from ...datasets import build_data
from ...training_utils import (
    ConfigError,
    DistContext,
    Progress,
    all_reduce_sum,
    atomic_write,
    autocast_dtype,
    build_ema,
    build_lr_scheduler,
    evaluate,
    load_state,
    model_from_config,
    param_groups,
    plot_metrics,
    seed_all,
    sync_buffers,
)
from ...training_utils import run as run_recipe
from ...training_utils.supervised import EpochRecipe, EpochRunConfig, check_epoch_config, save_classifier
from .models import build_model, model_default_cfg

__all__ = ["ClassificationConfig", "ClassificationRecipe", "check_config", "run"]


@dataclass
class ClassificationConfig(EpochRunConfig):
    """Everything one classification run depends on; each field is the ``gspn train`` flag of its name
    (``gspn train --help`` documents them); ``output_dir`` defaults to ``runs/<model>``."""

    output_dir: str = ""
    model: str = "gspn_micro"
    in_channels: int = 3
    ema_decay: float | None = None
    hflip: float | None = None
    crop_scale: tuple[float, float] | None = None
    crop_pct: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not self.output_dir:  # the run folder is named after the model unless given
            self.output_dir = f"runs/{self.model}"


def check_config(cfg: ClassificationConfig) -> None:
    """Reject settings that cannot train, before any work (one :class:`ConfigError` naming the field)."""
    check_epoch_config(cfg)
    check_int("in_channels", cfg.in_channels)
    check_number("ema_decay", cfg.ema_decay, 0, 1, hi_open=True, allow_none=True)
    check_number("crop_pct", cfg.crop_pct, 0, lo_open=True, allow_none=True)
    for name, values in (("mean", cfg.mean), ("std", cfg.std)):
        if values is None:
            continue
        if len(values) not in (1, cfg.in_channels) or not all(math.isfinite(v) for v in values):
            raise ConfigError(name, f"takes 1 or `in_channels` ({cfg.in_channels}) finite numbers, got {values!r}")
    if cfg.std is not None and min(cfg.std) <= 0:
        raise ConfigError("std", f"must be > 0, got {cfg.std!r}")
    if cfg.crop_scale is not None:
        lo, hi = cfg.crop_scale
        if not (0 <= lo <= hi <= 1 and hi > 0):
            raise ConfigError("crop_scale", f"LO,HI must satisfy 0 <= LO <= HI <= 1, HI > 0, got {lo},{hi}")
    if cfg.hflip is not None and not 0 <= cfg.hflip <= 1:
        raise ConfigError("hflip", f"must be a probability in [0, 1], got {cfg.hflip}")


def _build_model(cfg: ClassificationConfig, **kwargs: Any) -> nn.Module:
    """The classifier ``cfg`` names, with ``kwargs`` set by the run (:func:`model_from_config`)."""
    return model_from_config(build_model, cfg.model, cfg.model_args, **kwargs)


class ClassificationRecipe(EpochRecipe):
    """Supervised classification, one unit per epoch (see the module docstring)."""

    command: ClassVar[str] = "train"
    stateful: ClassVar[bool] = True
    run_files: ClassVar[tuple[str, ...]] = (*EpochRecipe.run_files, "best.pt", "model_ema.safetensors")

    config: ClassificationConfig

    def __init__(self, config: ClassificationConfig) -> None:
        super().__init__(config)
        self.step = 0
        self.best_acc, self.best_epoch = -1.0, -1
        self.elapsed = self.cpu_elapsed = 0.0
        self.improved = False
        self.record: dict[str, Any] = {}

    def check(self) -> None:
        check_config(self.config)

    def check_state(self, state: dict[str, Any], path: Path) -> None:
        cfg = self.config
        if "best_acc" not in state:
            raise ValueError(f"resume: {path} is not a `gspn train` training state")
        if state["model_name"] != cfg.model or state["model_args"] != cfg.model_args:
            raise ConfigError(
                "resume",
                f"the checkpoint is for model {state['model_name']} {state['model_args']}, not {cfg.model} "
                f"{cfg.model_args} ({path})",
            )

    def resume_note(self, changed: dict[str, tuple[Any, Any]]) -> str | None:
        if "epochs" not in changed:
            return None
        was, now = changed["epochs"]
        lr = self.optimizer.param_groups[0]["lr"]
        return (
            f"the cosine learning-rate schedule now spans {now} epochs instead of {was}: it continues at "
            f"{lr:.3g} (its value at step {self.step})"
        )

    # ----------------------------------------------------------------------------------------- build
    def build(self, ctx: DistContext) -> None:
        """Data, model (and its DDP wrapper and EMA), loaders, optimizer, schedule; seeded as the seeding rule says."""
        cfg, dev = self.config, ctx.device
        # The model is built with the same seed on every rank (DDP also broadcasts rank 0's weights).
        seed_all(cfg.seed)
        model_cfg: dict[str, Any] = {}
        if cfg.data != "digits" and not (cfg.image_size and cfg.mean and cfg.std):
            # image folders default to the model's input size and statistics: read its default_cfg
            probe = _build_model(cfg, num_classes=2, in_chans=cfg.in_channels)
            model_cfg = model_default_cfg(probe)
            del probe
        data = build_data(
            cfg.data,
            img_size=cfg.image_size,
            in_chans=cfg.in_channels,
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
        self.n_params = sum(p.numel() for p in model.parameters())
        self.ema = build_ema(model, cfg.ema_decay) if cfg.ema_decay else None
        self.ddp_model: nn.Module = model
        if ctx.distributed:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[dev.index] if dev.type == "cuda" else None
            )
        self.build_loaders(data.train, data.val)
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
        self.scheduler = build_lr_scheduler(
            self.optimizer,
            "cosine",
            total_steps=cfg.epochs * self.steps,
            warmup_steps=round(cfg.warmup_epochs * self.steps),
            min_lr_ratio=cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0,
        )
        self.amp_dtype = autocast_dtype(cfg.precision, dev)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.model, self.data = model, data
        self.meta = {
            "model_name": cfg.model,
            "model_args": cfg.model_args,
            "num_classes": data.num_classes,
            "in_chans": data.in_chans,
            "img_size": data.img_size,
            "mean": data.mean,
            "std": data.std,
            "classes": data.classes,
            "data": data.source,
        }

    def header(self) -> str:
        cfg, data = self.config, self.data
        return (
            f"model {cfg.model}: {self.n_params / 1e6:.3f}M params | data {data.source}: {len(data.train)} train / "
            f"{len(data.val)} val, {data.num_classes} classes, {data.img_size}px | {self.ctx.world_size} process(es) "
            f"on {self.ctx.device.type} | {cfg.epochs} epochs × {self.steps} steps"
        )

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "step": self.step,
            **self.meta,
            "best_acc": self.best_acc,
            "best_epoch": self.best_epoch,
            "elapsed_s": self.elapsed,
            "cpu_s": self.cpu_elapsed,
            "world_size": self.ctx.world_size,
            "record": self.record,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Weights, optimizer, schedule, scaler, EMA and counters; rank 0 repairs what a kill left out."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The schedule is a function of the step and of this config (epochs, lr, warm-up): the next step
        # runs at its value, also when a resume allowed those to change (the state holds the old value).
        self.scheduler.base_lrs = [self.config.lr] * len(self.optimizer.param_groups)
        for group, fn in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas, strict=True):
            group["initial_lr"] = self.config.lr
            group["lr"] = self.config.lr * fn(self.scheduler.last_epoch)
        if state.get("scaler") and self.scaler.is_enabled():  # None ({} in older files): no fp16 scaler then
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if state.get("ema") is None:
                warnings.warn("resume: the state has no EMA; starting the EMA from the current weights", stacklevel=3)
                self.ema = build_ema(self.model, self.config.ema_decay)
            else:
                self.ema.load_state_dict(state["ema"])
        self.step = state["step"]
        self.best_acc, self.best_epoch = state["best_acc"], state["best_epoch"]
        self.elapsed, self.cpu_elapsed = state.get("elapsed_s", 0.0), state.get("cpu_s", 0.0)
        if self.ctx.is_main:
            self._repair_after_kill(state)

    def _repair_after_kill(self, state: dict[str, Any]) -> None:
        """Bring ``best.pt`` and the plot in line with the ``last.pt`` being resumed (the runner has put
        its metrics record back if a kill lost it).

        A kill after ``last.pt`` of epoch E was written can leave ``best.pt`` one improvement behind: when
        epoch E was the best, ``last.pt`` *is* the best state.
        """
        out, epoch = self.out, state["epoch"]
        resumed = Path(self.config.resume) if self.config.resume not in (None, "auto") else out / "last.pt"
        best = out / "best.pt"
        if (
            state.get("best_epoch") == epoch
            and resumed.resolve() == (out / "last.pt").resolve()
            and (not best.exists() or load_state(best).get("epoch") != epoch)
        ):
            _copy_file(resumed, best)
        if self.config.plot and state.get("record") is not None:
            plot_metrics(out / "metrics.jsonl", out / "metrics.png")

    def checked_modules(self) -> dict[str, nn.Module]:
        return {"weights": self.model}

    # ----------------------------------------------------------------------------------------- epoch
    def run_unit(self, index: int, progress: Progress) -> dict[str, Any]:
        cfg, ctx, dev = self.config, self.ctx, self.ctx.device
        t0, c0 = time.perf_counter(), time.process_time()
        stats = self.train_epoch(index, progress, self.ddp_model, self.criterion, self.model, self.ema)
        loss_sum, correct, seen = all_reduce_sum([stats.loss_sum.item(), float(stats.correct.item()), stats.seen], ctx)
        train_time = time.perf_counter() - t0
        if not math.isfinite(loss_sum):
            return {"epoch": index, "train_loss": loss_sum / seen}
        sync_buffers(self.model, ctx)
        if self.ema is not None:
            sync_buffers(self.ema, ctx)
        val = evaluate(self.model, self.val_loader, dev, ctx, self.amp_dtype)
        ema_val = evaluate(self.ema.module, self.val_loader, dev, ctx, self.amp_dtype) if self.ema is not None else None
        self.elapsed += time.perf_counter() - t0
        self.cpu_elapsed += time.process_time() - c0
        score = ema_val["acc"] if ema_val is not None else val["acc"]
        self.improved = score > self.best_acc
        if self.improved:
            self.best_acc, self.best_epoch = score, index
        self.record = {
            "epoch": index,
            "step": self.step,
            "lr": self.scheduler.get_last_lr()[0],
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "val_loss": val["loss"],
            "val_acc": val["acc"],
            **({"ema_val_loss": ema_val["loss"], "ema_val_acc": ema_val["acc"]} if ema_val else {}),
            "best_acc": self.best_acc,
            "epoch_s": time.perf_counter() - t0,
            "train_imgs_per_s": seen / train_time,
            "elapsed_s": self.elapsed,
            "cpu_s": self.cpu_elapsed,
        }
        ema_txt = f" | ema val {ema_val['loss']:.4f} / {100 * ema_val['acc']:.2f}%" if ema_val else ""
        if ctx.is_main:
            progress.write(
                f"epoch {index + 1}/{cfg.epochs} | train {self.record['train_loss']:.4f} / "
                f"{100 * self.record['train_acc']:.2f}% | val {val['loss']:.4f} / {100 * val['acc']:.2f}%"
                f"{ema_txt} | {self.record['epoch_s']:.1f}s"
            )
        return self.record

    def after_save(self, index: int) -> None:
        """``best.pt`` (a copy of the ``last.pt`` just written, when this epoch improved) and the plot."""
        if self.improved:
            _copy_file(self.out / "last.pt", self.out / "best.pt")
        if self.config.plot:
            plot_metrics(self.out / "metrics.jsonl", self.out / "metrics.png")

    # ----------------------------------------------------------------------------------------- end
    def export(self, out: Path, finished: bool) -> dict[str, Any]:
        """Rank 0 exports the weights; every rank returns the summary (with each rank's weights digest)."""
        cfg = self.config
        digests = self.rank_digests(self.model)
        if self.ctx.is_main:
            save_classifier(self.model, out / "model.safetensors", self.meta, strict=False)
            if self.ema is not None:
                save_classifier(self.ema.module, out / "model_ema.safetensors", self.meta, strict=False)
        return {
            "model": cfg.model,
            "model_args": cfg.model_args,
            "params": self.n_params,
            "epochs": cfg.epochs,
            "steps": self.step,
            "world_size": self.ctx.world_size,
            "best_acc": self.best_acc,
            "best_epoch": self.best_epoch,
            "final": self.record,
            "elapsed_s": self.elapsed,
            "cpu_s": self.cpu_elapsed,
            "rank_weight_digests": digests,
            "output": str(out),
        }

    def closing(self, summary: dict[str, Any]) -> str:
        return f"best val acc {100 * self.best_acc:.2f}% (epoch {self.best_epoch + 1}); outputs in {self.out}"


def _copy_file(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of ``src``, atomically (``best.pt`` is the ``last.pt`` of its epoch)."""
    with src.open("rb") as f_src:
        atomic_write(dst, lambda f: shutil.copyfileobj(f_src, f))


def run(config: ClassificationConfig) -> dict[str, Any]:
    """Train a classifier as ``config`` says (:func:`gspn.training_utils.run` of :class:`ClassificationRecipe`);
    return the run summary (also ``<output_dir>/summary.json``)."""
    return run_recipe(ClassificationRecipe(config))
