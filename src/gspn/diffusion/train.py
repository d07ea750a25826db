"""``gspn train-dit``: train a class-conditional GSPN-DiT.

Example (a fresh CPU machine, no download)::

    gspn train-dit --model gspn_dit_tiny --data digits --image-size 16 \\
        --steps 2000 --batch-size 64 --output-dir runs/dit_digits

Features: the bundled digits, an ImageFolder or pre-extracted VAE latents (``--data``); the
diffusion loss of :mod:`gspn.diffusion.gaussian`; AdamW with linear warm-up; gradient clipping;
EMA weights; an atomic checkpoint ``OUT/last.pt`` every ``--ckpt-every`` steps (and on
``--max-minutes``) from which ``--resume`` continues *exactly* (the data order and all random
draws are functions of ``(seed, step, rank)``); JSON-lines metrics ``OUT/metrics.jsonl`` and a
loss plot ``OUT/loss.png``; a tqdm progress bar; a sample grid at the end (``OUT/samples.png``)
and the EMA weights as ``OUT/ema.safetensors`` (loadable with :func:`gspn.models.load_model`).
Multi-process: ``torchrun --nproc_per_node=N -m gspn train-dit ...`` (gloo on CPU, NCCL on
GPU; ``--batch-size`` is the global batch).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._files import check_output_dir, claim_run_dir
from .._validate import check_int, check_number, parse_model_args
from ..models import create_model, get_default_cfg, list_models, save_checkpoint
from ..training_utils import (
    Panel,
    all_gather_objects,
    append_metrics,
    build_ema,
    build_lr_scheduler,
    capture_rng,
    check_finite,
    cleanup_distributed,
    derive_seed,
    init_distributed,
    load_state,
    plot_metrics,
    restore_rank_rng,
    save_state,
    training_state,
    truncate_metrics,
)
from .data import load_dataset
from .gaussian import diffusion_loss, make_train_scheduler

__all__ = ["DiTTrainConfig", "batch_indices", "parse_model_args", "run", "run_train"]

_LOSS_PANEL = Panel("diffusion loss", "", (("loss", "loss"), ("mse", "mse")), log=True)
"""``loss.png``: the logged losses against the optimizer step."""


@dataclass
class DiTTrainConfig:
    """Everything one ``train-dit`` run depends on (``gspn train-dit --help`` documents each field;
    ``model_args`` are the parsed ``--model-arg`` overrides)."""

    model: str = "gspn_dit_tiny"
    model_args: dict[str, Any] = field(default_factory=dict)
    data: str = "digits"
    image_size: int = 16
    in_channels: int = 1
    class_dropout: float = 0.1
    learn_sigma: bool = True
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    clip_grad: float | None = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    output_dir: str = "runs/dit"
    resume: str | None = None
    overwrite: bool = False
    ckpt_every: int = 500
    log_every: int = 10
    max_minutes: float = 0.0
    sample_steps: int = 100
    sampler: str = "ddpm"
    cfg_scale: float = 3.0
    device: str = "auto"
    threads: int = 0
    progress: bool = True


def batch_indices(num_items: int, step: int, batch: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Dataset indices of ``rank``'s batch at ``step``: a function of its arguments only (exact resume).

    Each epoch is a permutation seeded by ``(seed, epoch)``; rank ``r`` takes ``perm[r::world]``
    and cuts it into batches of ``batch``, dropping the remainder.
    """
    per_rank = num_items // world
    steps_per_epoch = per_rank // batch
    if steps_per_epoch == 0:
        raise ValueError(f"{num_items} items cannot fill a batch of {batch} on each of {world} processes")
    epoch, i = divmod(step, steps_per_epoch)
    perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    mine = perm[rank::world][:per_rank]
    return mine[i * batch : (i + 1) * batch]


RUN_FILES = ("last.pt", "metrics.jsonl", "config.json", "ema.safetensors", "samples.png", "loss.png")
"""The files a ``train-dit`` run writes in its folder (their presence marks the folder as a run's)."""


def _validate(cfg: DiTTrainConfig) -> None:
    """Reject nonsense settings before any work (one ``ValueError`` naming the option)."""
    if get_default_cfg(cfg.model).get("task", "classification") != "diffusion":
        raise ValueError(
            f"--model {cfg.model!r} is not a diffusion model (train classifiers with `gspn train`); "
            f"choose from {', '.join(list_models(task='diffusion'))}"
        )
    for name in ("steps", "batch_size", "image_size", "num_train_timesteps", "ckpt_every", "log_every"):
        check_int(name, getattr(cfg, name))
    for name in ("sample_steps", "threads"):
        check_int(name, getattr(cfg, name), minimum=0)
    check_number("lr", cfg.lr, 0, lo_open=True)
    check_number("weight_decay", cfg.weight_decay, 0)
    check_number("clip_grad", cfg.clip_grad, 0, allow_none=True)
    check_number("ema_decay", cfg.ema_decay, 0, 1, hi_open=True)
    check_number("class_dropout", cfg.class_dropout, 0, 1, hi_open=True)
    check_number("cfg_scale", cfg.cfg_scale, 0)
    check_number("max_minutes", cfg.max_minutes, 0)
    check_int("warmup_steps", cfg.warmup_steps, minimum=0)
    if cfg.resume not in (None, "none", "") and cfg.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    check_output_dir(cfg.output_dir)


@dataclass
class _Run:
    """What one ``train-dit`` run trains (built by :func:`_setup`)."""

    model: nn.Module
    train_model: nn.Module
    ema: Any
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    noise_scheduler: Any
    schedule: dict[str, Any]
    meta: dict[str, Any]
    x_all: torch.Tensor
    y_all: torch.Tensor
    per_rank: int
    record: dict[str, Any]


def _setup(cfg: DiTTrainConfig, ctx: Any) -> _Run:
    dataset, meta = load_dataset(cfg.data, cfg.image_size, cfg.in_channels)
    c, h, _ = meta["shape"]
    overrides = {
        "in_channels": c,
        "input_size": h,
        "num_classes": meta["num_classes"],
        "class_dropout_prob": cfg.class_dropout,
        "learn_sigma": cfg.learn_sigma,
        **cfg.model_args,
    }
    torch.manual_seed(cfg.seed)
    try:
        model = create_model(cfg.model, **overrides).to(ctx.device)
    except TypeError as exc:  # an unknown or ill-typed --model-arg: one error line, not a traceback
        raise ValueError(f"--model-arg {cfg.model_args} for {cfg.model}: {exc}") from exc
    patch = getattr(model, "patch_size", 1)
    if h % patch or meta["shape"][2] % patch:  # else the first step fails, after config.json is written
        what = "--image-size" if meta["kind"] == "pixels" else "the latents' size"
        raise ValueError(f"{what} ({h}×{meta['shape'][2]}) must be a multiple of {cfg.model}'s patch size {patch}")
    ema = build_ema(model, cfg.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_scheduler = build_lr_scheduler(opt, "constant", cfg.steps, cfg.warmup_steps)
    schedule = {
        "num_train_timesteps": cfg.num_train_timesteps,
        "beta_schedule": cfg.beta_schedule,
        "learn_sigma": model.learn_sigma,
        "clip_sample": meta["kind"] == "pixels",
    }
    per_rank = cfg.batch_size // ctx.world_size
    if per_rank * ctx.world_size != cfg.batch_size:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by {ctx.world_size} processes")
    record = {
        "model_name": cfg.model,
        "model_args": model.model_args,
        "schedule": schedule,
        "data": {k: v for k, v in meta.items() if k != "classes"},
        "config": asdict(cfg),
    }
    x_all, y_all = dataset.tensors
    return _Run(
        model=model,
        train_model=model,
        ema=ema,
        optimizer=opt,
        lr_scheduler=lr_scheduler,
        noise_scheduler=make_train_scheduler(**schedule),
        schedule=schedule,
        meta=meta,
        x_all=x_all,
        y_all=y_all,
        per_rank=per_rank,
        record=record,
    )


def _restore(run: _Run, path: Path, ctx: Any) -> int:
    """Load ``last.pt`` (the kit's training state; older DiT key names are read too) into ``run``;
    returns its step."""
    ckpt = load_state(path, map_location=ctx.device)
    if not isinstance(ckpt, dict) or "schedule" not in ckpt or "model" not in ckpt:
        raise ValueError(
            f"--resume {path}: not a `gspn train-dit` checkpoint"
            + (f" (it holds {ckpt['model_name']!r})" if isinstance(ckpt, dict) and "model_name" in ckpt else "")
        )
    name, args = ckpt.get("model_name"), ckpt.get("model_args")
    if (name is not None and name != run.record["model_name"]) or (
        args is not None and dict(args) != dict(run.record["model_args"])
    ):
        raise ValueError(
            f"--resume {path}: the checkpoint is for model {name} {args}, "
            f"not {run.record['model_name']} {run.record['model_args']} (check --model, --model-arg, "
            "--image-size, --in-channels and the data)"
        )
    run.model.load_state_dict(ckpt["model"])
    run.ema.load_state_dict(ckpt["ema"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("rng") is not None:  # every random draw of a step is re-seeded anyway (derive_seed)
        restore_rank_rng(ckpt["rng"], ctx.rank, ctx.world_size, warn=False)
    start = int(ckpt["step"])
    # The schedule is a function of the step and of this run's --lr/--warmup-steps (which may differ
    # from the checkpoint's): fast-forward the LambdaLR to ``start`` instead of loading its state.
    sched = run.lr_scheduler
    sched.last_epoch = start
    for group, base, fn in zip(run.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
        group["initial_lr"] = base
        group["lr"] = base * fn(start)
    return start


def train_step(
    run: _Run, cfg: DiTTrainConfig, step: int, rank: int, world: int, device: torch.device
) -> tuple[dict[str, torch.Tensor], float, torch.Tensor]:
    """Optimizer step ``step`` (0-based): its batch and noise are functions of ``(seed, step, rank)``.

    Returns the losses, the learning rate used and the gradient norm (NaN without clipping)."""
    torch.manual_seed(derive_seed(cfg.seed, step, rank))
    idx = batch_indices(len(run.x_all), step, run.per_rank, cfg.seed, rank, world)
    x, y = run.x_all[idx].to(device), run.y_all[idx].to(device)
    lr = run.optimizer.param_groups[0]["lr"]
    losses = diffusion_loss(run.train_model, run.noise_scheduler, x, y, run.model.learn_sigma)
    run.optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    grad_norm = (
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.clip_grad)
        if cfg.clip_grad
        else torch.tensor(float("nan"))
    )
    run.optimizer.step()
    run.lr_scheduler.step()
    run.ema.update_parameters(run.model)
    return losses, lr, grad_norm


def _save(run: _Run, out: Path, step: int, ctx: Any) -> None:
    """``last.pt`` (the kit's one training-state format, :func:`~gspn.training_utils.training_state`) and
    the loss plot; never non-finite weights. Called on every rank (the RNG states are gathered)."""
    check_finite(run.model, step)
    rngs = all_gather_objects(capture_rng(), ctx)
    if ctx.is_main:
        extra = {k: v for k, v in run.record.items() if k != "config"}
        state = training_state(
            model=run.model.state_dict(),
            optimizer=run.optimizer.state_dict(),
            scheduler=run.lr_scheduler.state_dict(),
            ema=run.ema.state_dict(),
            step=step,
            rng=rngs,
            config=run.record["config"],
            **extra,
        )
        save_state(out / "last.pt", state)
        plot_metrics(out / "metrics.jsonl", out / "loss.png", (_LOSS_PANEL,), x="step", x_offset=0)


def _export(run: _Run, cfg: DiTTrainConfig, out: Path, step: int, device: torch.device) -> dict[str, Any]:
    """The EMA weights as ``ema.safetensors`` and, for pixel data, a sample grid."""
    check_finite(run.ema.module, step, "EMA weights")
    save_checkpoint(
        run.ema.module,
        out / "ema.safetensors",
        metadata={"gspn.diffusion": json.dumps({"schedule": run.schedule, "data": run.record["data"]})},
    )
    if cfg.sample_steps > 0 and run.meta["kind"] == "pixels":  # latents would need the VAE to view
        from .sample import generate, save_images

        n = run.meta["num_classes"]
        labels = [i % n for i in range(min(n, 10) * 8)]
        imgs = generate(
            run.ema.module,
            run.schedule,
            labels,
            tuple(run.meta["shape"]),
            cfg.sample_steps,
            cfg.sampler,
            cfg.cfg_scale,
            seed=cfg.seed,
            device=device,
        )
        save_images(imgs, out / "samples.png", nrow=min(n, 10))
        return {"samples": str(out / "samples.png")}
    return {}


def run(config: DiTTrainConfig) -> dict[str, Any]:
    """Train a GSPN-DiT as ``config`` says; returns a summary (final step, last losses, paths)."""
    cfg = config
    _validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ctx = init_distributed(cfg.device)
    rank, world, main, device = ctx.rank, ctx.world_size, ctx.is_main, ctx.device
    out = Path(cfg.output_dir)
    metrics = out / "metrics.jsonl"
    resume_arg = None if cfg.resume in ("none", "") else cfg.resume
    ok = False
    run_dir = None
    try:
        if main:  # rank 0 owns the folder; the others only read it
            run_dir = claim_run_dir(out, RUN_FILES, resume=resume_arg is not None, overwrite=cfg.overwrite)
        r = _setup(cfg, ctx)
        start = 0
        resume = out / "last.pt" if resume_arg == "auto" else None if resume_arg is None else Path(resume_arg)
        if resume is not None and resume.is_file():
            start = _restore(r, resume, ctx)
            if main:
                print(f"resumed from {resume} at step {start}")
        elif resume_arg not in (None, "auto"):
            raise FileNotFoundError(f"--resume {resume_arg}: no such checkpoint")
        if world > 1:
            r.train_model = nn.parallel.DistributedDataParallel(
                r.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        if main:
            out.mkdir(parents=True, exist_ok=True)
            truncate_metrics(metrics, start, key="step")
            (out / "config.json").write_text(json.dumps(r.record, indent=2, default=str))

        bar = None
        if main and cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=start, desc="train-dit", dynamic_ncols=True)
        t0 = time.time()
        window: dict[str, float] = {"loss": 0.0, "mse": 0.0, "vb": 0.0}
        n_window, t_window, last = 0, time.time(), {}
        step, timed_out = start, False
        r.model.train()
        while step < cfg.steps:
            losses, lr, grad_norm = train_step(r, cfg, step, rank, world, device)
            step += 1
            for k in window:
                window[k] += float(losses[k].detach())
            if not math.isfinite(window["loss"]):
                raise FloatingPointError(
                    f"non-finite loss at step {step} (lr {lr:g}); stopped before writing anything of this "
                    f"step: {out / 'last.pt'} keeps the last good state (lower --lr or set --clip-grad)"
                )
            n_window += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(losses['loss']):.4f}")
            if step % cfg.log_every == 0 or step == cfg.steps:
                dt = time.time() - t_window
                last = {k: v / n_window for k, v in window.items()}
                if main:
                    append_metrics(
                        metrics,
                        {
                            "step": step,
                            **last,
                            "lr": lr,
                            "grad_norm": float(grad_norm),
                            "sec_per_step": dt / n_window,
                            "imgs_per_sec": n_window * cfg.batch_size / max(dt, 1e-9),
                            "elapsed_min": (time.time() - t0) / 60,
                        },
                    )
                window = dict.fromkeys(window, 0.0)
                n_window, t_window = 0, time.time()
            timed_out = cfg.max_minutes > 0 and (time.time() - t0) / 60 >= cfg.max_minutes
            if step % cfg.ckpt_every == 0 or step == cfg.steps or timed_out:
                _save(r, out, step, ctx)
            if timed_out:
                if main:
                    print(f"--max-minutes {cfg.max_minutes} reached at step {step}; checkpoint saved")
                break
        if bar is not None:
            bar.close()
        summary: dict[str, Any] = {"step": step, "out": str(out), "minutes": (time.time() - t0) / 60, **last}
        if main and (step == cfg.steps or timed_out):
            summary.update(_export(r, cfg, out, step, device))
        ok = True
        return summary
    finally:
        if run_dir is not None:
            run_dir.release()
        cleanup_distributed(ok)


run_train = run
"""The name of :func:`run` before the recipes took dataclass configs."""


if __name__ == "__main__":  # deprecated spelling of ``gspn train-dit`` (the command package owns the flags)
    import sys

    from ..commands import main as _main

    sys.exit(_main(["train-dit", *sys.argv[1:]]))
