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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._files import atomic_torch_save, check_output_dir, claim_run_dir, safe_torch_load
from .._validate import check_int, check_number, parse_model_args
from ..models import create_model, save_checkpoint
from ..train.checkpoint import capture_rng
from ..train.distributed import cleanup_distributed, init_distributed
from ..train.ema import build_ema
from ..train.factory import available_models, model_task
from ..train.metrics import Panel, append_metrics, plot_metrics, truncate_metrics
from .data import load_dataset
from .gaussian import diffusion_loss, make_train_scheduler

__all__ = ["batch_indices", "parse_model_args", "run_train"]

_LOSS_PANEL = Panel("diffusion loss", "", (("loss", "loss"), ("mse", "mse")), log=True)
"""``loss.png``: the logged losses against the optimizer step."""




def batch_indices(
    num_items: int, step: int, batch: int, seed: int, rank: int = 0, world: int = 1
) -> torch.Tensor:
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


def _validate_args(args: Any) -> None:
    """Reject nonsense settings before any work (one ``ValueError`` naming the option)."""
    for name in ("steps", "batch_size", "image_size", "num_train_timesteps", "ckpt_every", "log_every"):
        check_int(name, getattr(args, name))
    for name in ("sample_steps", "threads"):
        check_int(name, getattr(args, name), minimum=0)
    check_number("lr", args.lr, 0, lo_open=True)
    check_number("weight_decay", args.weight_decay, 0)
    check_number("clip_grad", args.clip_grad, 0, allow_none=True)
    check_number("ema_decay", args.ema_decay, 0, 1, hi_open=True)
    check_number("class_dropout", args.class_dropout, 0, 1, hi_open=True)
    check_number("cfg_scale", args.cfg_scale, 0)
    check_number("max_minutes", args.max_minutes, 0)
    check_int("warmup_steps", args.warmup_steps, minimum=0)
    if getattr(args, "resume", None) not in (None, "none", "") and getattr(args, "overwrite", False):
        raise ValueError("--resume and --overwrite exclude each other")
    check_output_dir(args.output_dir)


def _check_finite(model: nn.Module, step: int, what: str = "weights") -> None:
    """Raise ``FloatingPointError`` if any parameter of ``model`` is NaN or infinite."""
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise FloatingPointError(
            f"non-finite {what} at step {step} ({len(bad)} tensors, e.g. {bad[0]}); stopped before writing: "
            "the run folder keeps the last good state (lower --lr or set --clip-grad)"
        )


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


def _lr_at(step: int, args: Any) -> float:
    return args.lr * min(1.0, (step + 1) / max(args.warmup_steps, 1))


def run_train(args: Any) -> dict[str, Any]:
    """Run ``train-dit`` with parsed ``args``; returns a summary (final step, last losses, paths)."""
    if model_task(args.model) != "diffusion":
        raise ValueError(f"--model {args.model!r} is not a diffusion model (train classifiers with `gspn train`); "
                         f"choose from {', '.join(available_models(task='diffusion'))}")
    _validate_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = init_distributed(args.device)
    rank, world, main, device = ctx.rank, ctx.world_size, ctx.is_main, ctx.device
    out = Path(args.output_dir)
    metrics = out / "metrics.jsonl"
    resume_arg = getattr(args, "resume", None)
    if resume_arg in ("none", ""):
        resume_arg = None
    ok = False
    run_dir = None
    try:
        if main:  # rank 0 owns the folder; the others only read it
            run_dir = claim_run_dir(out, RUN_FILES, resume=resume_arg is not None,
                                    overwrite=bool(getattr(args, "overwrite", False)))
        dataset, meta = load_dataset(args.data, args.image_size, args.in_channels)
        c, h, w = meta["shape"]
        overrides = {
            "in_channels": c,
            "input_size": h,
            "num_classes": meta["num_classes"],
            "class_dropout_prob": args.class_dropout,
            "learn_sigma": args.learn_sigma,
            **parse_model_args(args.model_arg),
        }
        torch.manual_seed(args.seed)
        model = create_model(args.model, **overrides).to(device)
        ema = build_ema(model, args.ema_decay)
        learn_sigma = model.learn_sigma
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        schedule = {
            "num_train_timesteps": args.num_train_timesteps,
            "beta_schedule": args.beta_schedule,
            "learn_sigma": learn_sigma,
            "clip_sample": meta["kind"] == "pixels",
        }
        scheduler = make_train_scheduler(**schedule)
        start = 0
        resume = out / "last.pt" if resume_arg == "auto" else None if resume_arg is None else Path(resume_arg)
        if resume is not None and resume.is_file():
            ckpt = safe_torch_load(resume, map_location=device)
            model.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
            opt.load_state_dict(ckpt["opt"])
            start = int(ckpt["step"])
            if main:
                print(f"resumed from {resume} at step {start}")
        elif resume_arg not in (None, "auto"):
            raise FileNotFoundError(f"--resume {resume_arg}: no such checkpoint")
        train_model: nn.Module = model
        if world > 1:
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        per_rank = args.batch_size // world
        if per_rank * world != args.batch_size:
            raise ValueError(f"--batch-size {args.batch_size} is not divisible by {world} processes")
        record = {
            "arch": args.model,
            "model_args": model.model_args,
            "schedule": schedule,
            "data": {k: v for k, v in meta.items() if k != "classes"},
            "args": {k: v for k, v in vars(args).items() if not callable(v)},  # drop the CLI's _run
        }
        if main:
            out.mkdir(parents=True, exist_ok=True)
            truncate_metrics(metrics, start, key="step")
            (out / "config.json").write_text(json.dumps(record, indent=2, default=str))

        def save(step: int) -> None:
            _check_finite(model, step)
            if main:
                atomic_torch_save(
                    {
                        "model": model.state_dict(),
                        "ema": ema.state_dict(),
                        "opt": opt.state_dict(),
                        "step": step,
                        "rng": capture_rng(),
                        **record,
                    },
                    out / "last.pt",
                )
                plot_metrics(metrics, out / "loss.png", (_LOSS_PANEL,), x="step", x_offset=0)

        x_all, y_all = dataset.tensors
        bar = None
        if main and args.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=args.steps, initial=start, desc="train-dit", dynamic_ncols=True)
        t0 = time.time()
        window: dict[str, float] = {"loss": 0.0, "mse": 0.0, "vb": 0.0}
        n_window, t_window, last = 0, time.time(), {}
        step, timed_out = start, False
        model.train()
        while step < args.steps:
            torch.manual_seed(_step_seed(args.seed, step, rank))
            idx = batch_indices(len(x_all), step, per_rank, args.seed, rank, world)
            x, y = x_all[idx].to(device), y_all[idx].to(device)
            lr = _lr_at(step, args)
            for group in opt.param_groups:
                group["lr"] = lr
            losses = diffusion_loss(train_model, scheduler, x, y, learn_sigma)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                if args.clip_grad
                else torch.tensor(float("nan"))
            )
            opt.step()
            ema.update_parameters(model)
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
            if step % args.log_every == 0 or step == args.steps:
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
                            "imgs_per_sec": n_window * args.batch_size / max(dt, 1e-9),
                            "elapsed_min": (time.time() - t0) / 60,
                        },
                    )
                window = dict.fromkeys(window, 0.0)
                n_window, t_window = 0, time.time()
            timed_out = args.max_minutes > 0 and (time.time() - t0) / 60 >= args.max_minutes
            if step % args.ckpt_every == 0 or step == args.steps or timed_out:
                save(step)
            if timed_out:
                if main:
                    print(f"--max-minutes {args.max_minutes} reached at step {step}; checkpoint saved")
                break
        if bar is not None:
            bar.close()
        summary: dict[str, Any] = {"step": step, "out": str(out), "minutes": (time.time() - t0) / 60, **last}
        if main and (step == args.steps or timed_out):
            _check_finite(ema.module, step, "EMA weights")
            save_checkpoint(
                ema.module,
                out / "ema.safetensors",
                metadata={"gspn.diffusion": json.dumps({"schedule": schedule, "data": record["data"]})},
            )
            if args.sample_steps > 0 and meta["kind"] == "pixels":  # latents would need the VAE to view
                from .sample import generate, save_images

                n = meta["num_classes"]
                labels = [i % n for i in range(min(n, 10) * 8)]
                imgs = generate(
                    ema.module,
                    schedule,
                    labels,
                    (c, h, w),
                    args.sample_steps,
                    args.sampler,
                    args.cfg_scale,
                    seed=args.seed,
                    device=device,
                )
                save_images(imgs, out / "samples.png", nrow=min(n, 10))
                summary["samples"] = str(out / "samples.png")
        ok = True
        return summary
    finally:
        if run_dir is not None:
            run_dir.release()
        cleanup_distributed(ok)


if __name__ == "__main__":  # deprecated spelling of ``gspn train-dit`` (the command package owns the flags)
    import sys

    from ..commands import main as _main

    sys.exit(_main(["train-dit", *sys.argv[1:]]))
