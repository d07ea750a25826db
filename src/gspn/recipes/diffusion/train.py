"""``gspn train-dit``: train a class-conditional GSPN-DiT, on the kit's runner (one unit per optimizer step).

Example (a fresh CPU machine, no download)::

    gspn train-dit --model gspn_dit_tiny --data digits --image-size 16 \\
        --steps 2000 --batch-size 64 --output-dir runs/dit_digits

Features: the bundled digits, an ImageFolder or pre-extracted VAE latents (``data``); the diffusion loss
of :mod:`.gaussian`; AdamW with linear warm-up; gradient clipping; EMA weights; JSON-lines metrics
``OUT/metrics.jsonl`` (every ``log_every`` steps) and a loss plot ``OUT/loss.png``; a sample grid at the
end (``OUT/samples.png``, with its own progress report) and the EMA weights as ``OUT/ema.safetensors``
(loadable with :func:`gspn.models.load_model`). Multi-process: ``torchrun --nproc_per_node=N -m gspn
train-dit ...`` (gloo on CPU, NCCL on GPU; ``batch_size`` is the global batch).

The runner (:func:`gspn.training_utils.run`) owns the folder, resume, the loop, the non-finite guard and
``last.pt``: the state is written every ``ckpt_every`` steps, at the end, on ``max_minutes`` and on
Ctrl-C; ``resume`` continues it *exactly* (the data order and all random draws are functions of
``(seed, step, rank)``). ``OUT/config.json`` (the model, schedule, data and config of the run, readable)
is written with each ``last.pt``, so a run that fails before its first state leaves no file behind.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..._files import atomic_write
from ..._validate import check_int, check_number
from ...models import create_model, get_default_cfg, is_model, list_models, save_checkpoint
from ...training_utils import (
    ConfigError,
    DistContext,
    Panel,
    Progress,
    Recipe,
    RunConfig,
    build_ema,
    build_lr_scheduler,
    check_finite,
    config_dict,
    derive_seed,
    json_safe,
    model_from_config,
    plot_metrics,
)
from ...training_utils import run as run_recipe
from .data import load_dataset
from .gaussian import SAMPLERS, diffusion_loss, make_train_scheduler

__all__ = ["DiTTrainConfig", "DiTTrainRecipe", "batch_indices", "run"]

_LOSS_PANEL = Panel("diffusion loss", "", (("loss", "loss"), ("mse", "mse")), log=True)
"""``loss.png``: the logged losses against the optimizer step."""


@dataclass
class DiTTrainConfig(RunConfig):
    """Everything one ``train-dit`` run depends on; each field is the ``gspn train-dit`` flag of its name
    (``gspn train-dit --help`` documents them; ``model_args`` are the ``--model-arg`` overrides)."""

    output_dir: str = "runs/dit"
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
    ckpt_every: int = 500
    log_every: int = 10
    max_minutes: float = 0.0
    sample_steps: int = 100
    sampler: str = "ddpm"
    cfg_scale: float = 3.0


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


def check_config(cfg: DiTTrainConfig) -> None:
    """Reject settings that cannot train, before any work (one :class:`ConfigError` naming the field)."""
    if not is_model(cfg.model) or get_default_cfg(cfg.model).get("task", "classification") != "diffusion":
        raise ConfigError(
            "model",
            f"{cfg.model!r} is not a diffusion model (those are {', '.join(list_models(task='diffusion'))}; "
            "classifiers train with `gspn train`)",
        )
    for name in ("steps", "batch_size", "image_size", "num_train_timesteps", "ckpt_every", "log_every"):
        check_int(name, getattr(cfg, name))
    check_int("sample_steps", cfg.sample_steps, minimum=0)
    check_int("warmup_steps", cfg.warmup_steps, minimum=0)
    check_number("lr", cfg.lr, 0, lo_open=True)
    check_number("weight_decay", cfg.weight_decay, 0)
    check_number("clip_grad", cfg.clip_grad, 0, allow_none=True)
    check_number("ema_decay", cfg.ema_decay, 0, 1, hi_open=True)
    check_number("class_dropout", cfg.class_dropout, 0, 1, hi_open=True)
    check_number("cfg_scale", cfg.cfg_scale, 0)
    check_number("max_minutes", cfg.max_minutes, 0)
    if cfg.sampler not in SAMPLERS:
        raise ConfigError("sampler", f"must be one of {', '.join(SAMPLERS)}, not {cfg.sampler!r}")


#: The model's constructor arguments that a run sets from its fields (the others come from ``model_args``).
_ARCH_FIELDS = {
    "input_size": "`image_size` / `data`",
    "in_channels": "`in_channels` / `data`",
    "num_classes": "`data`",
    "class_dropout_prob": "`class_dropout`",
    "learn_sigma": "`learn_sigma`",
}


class DiTTrainRecipe(Recipe):
    """Class-conditional GSPN-DiT training, one unit per optimizer step (see the module docstring)."""

    command: ClassVar[str] = "train-dit"
    stateful: ClassVar[bool] = True
    unit: ClassVar[str] = "step"
    loss_key: ClassVar[str] = "loss"
    #: How the run is carried out (checkpoint period, logging, time limit, the final grid): changes neither
    #: the trained weights nor the data order, so a resume may change them without ``allow_changes``.
    free_fields: ClassVar[frozenset[str]] = frozenset(
        {"ckpt_every", "log_every", "max_minutes", "sample_steps", "sampler", "cfg_scale"}
    )
    run_files: ClassVar[tuple[str, ...]] = (
        "last.pt",
        "metrics.jsonl",
        "config.json",
        "summary.json",
        "ema.safetensors",
        "samples.png",
        "loss.png",
    )

    config: DiTTrainConfig

    def __init__(self, config: DiTTrainConfig) -> None:
        super().__init__(config)
        self.step = 0
        self.last: dict[str, float] = {}
        self._t0: float | None = None
        self._timed_out = False

    # ------------------------------------------------------------------ before anything is written
    def check(self) -> None:
        check_config(self.config)

    def check_state(self, state: dict[str, Any], path: Path) -> None:
        cfg = self.config
        if "schedule" not in state or "model" not in state:
            held = f" (it holds {state['model_name']!r})" if "model_name" in state else ""
            raise ValueError(f"resume: {path} is not a `gspn train-dit` training state{held}")
        saved = state.get("config") or {}
        name, args = state.get("model_name"), saved.get("model_args")
        if (name is not None and name != cfg.model) or (
            args is not None and json_safe(args) != json_safe(cfg.model_args)
        ):
            raise ConfigError("resume", f"{path} is for model {name} {args}, not {cfg.model} {cfg.model_args}")

    def resume_note(self, changed: dict[str, tuple[Any, Any]]) -> str | None:
        notes = []
        if "lr" in changed or "warmup_steps" in changed:
            notes.append("the learning rate follows this run's lr and warmup_steps from the resumed step on")
        if "steps" in changed:
            notes.append(f"the constant learning rate goes on to step {changed['steps'][1]}")
        return "; ".join(notes) or None

    # ------------------------------------------------------------------ build
    def build(self, ctx: DistContext) -> None:
        """Data, model (its DDP wrapper and EMA), optimizer, schedule; the model seeded with ``seed``."""
        cfg, dev = self.config, ctx.device
        dataset, meta = load_dataset(cfg.data, cfg.image_size, cfg.in_channels)
        c, h, w = meta["shape"]
        overrides = {
            "in_channels": c,
            "input_size": h,
            "num_classes": meta["num_classes"],
            "class_dropout_prob": cfg.class_dropout,
            "learn_sigma": cfg.learn_sigma,
            **cfg.model_args,
        }
        torch.manual_seed(cfg.seed)
        fixed = {k: v for k, v in overrides.items() if k not in cfg.model_args}  # an override wins here
        model = model_from_config(create_model, cfg.model, cfg.model_args, **fixed).to(dev)
        patch = getattr(model, "patch_size", 1)
        if h % patch or w % patch:  # else the first step fails
            field_, what = ("image_size", "") if meta["kind"] == "pixels" else ("data", "latents of ")
            raise ConfigError(field_, f"({what}{h}×{w}) must be a multiple of {cfg.model}'s patch size {patch}")
        self.per_rank = cfg.batch_size // ctx.world_size
        if self.per_rank * ctx.world_size != cfg.batch_size:
            raise ConfigError("batch_size", f"({cfg.batch_size}) must be divisible by the {ctx.world_size} processes")
        self.x_all, self.y_all = dataset.tensors
        if len(self.x_all) // ctx.world_size < self.per_rank:
            raise ConfigError(
                "batch_size",
                f"({cfg.batch_size}) must be at most the {len(self.x_all)} training samples "
                f"({ctx.world_size} process(es))",
            )
        self.model = model
        self.ema = build_ema(model, cfg.ema_decay)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, "constant", cfg.steps, cfg.warmup_steps)
        self.schedule = {
            "num_train_timesteps": cfg.num_train_timesteps,
            "beta_schedule": cfg.beta_schedule,
            "learn_sigma": model.learn_sigma,
            "clip_sample": meta["kind"] == "pixels",
        }
        self.noise_scheduler = make_train_scheduler(**self.schedule)
        self.meta = meta
        self.record = {
            "model_name": cfg.model,
            "model_args": model.model_args,
            "schedule": self.schedule,
            "data": {k: v for k, v in meta.items() if k != "classes"},
        }
        self.train_model: nn.Module = model
        if ctx.distributed:
            self.train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[dev.index] if dev.type == "cuda" else None
            )
        self.n_params = sum(p.numel() for p in model.parameters())
        self._window = dict.fromkeys(("loss", "mse", "vb"), 0.0)
        self._n_window = 0

    def num_units(self) -> int:
        return self.config.steps

    def header(self) -> str:
        cfg, meta, ctx = self.config, self.meta, self.ctx
        shape = "×".join(map(str, meta["shape"]))
        line = (
            f"train-dit: model {cfg.model} ({self.n_params / 1e6:.3f}M params) | data {cfg.data}: "
            f"{len(self.x_all)} {meta['kind']} of {shape}, {meta['num_classes']} classes | "
            f"{ctx.world_size} process(es) on {ctx.device.type} | {cfg.steps} steps × batch {cfg.batch_size}"
        )
        if cfg.resume == "auto" and not (self.out / "last.pt").is_file():
            line += f" | nothing to resume in {self.out}: starting at step 1"
        return line

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.lr_scheduler.state_dict(),
            "ema": self.ema.state_dict(),
            "step": self.step,
            # the loss sums of the log window in progress: a resume inside a window logs what an
            # uninterrupted run logs
            "log_window": {"sums": dict(self._window), "steps": self._n_window},
            **self.record,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Weights, EMA, optimizer and the step; the schedule is fast-forwarded to the step."""
        args = state.get("model_args")
        if args is not None and dict(args) != dict(self.record["model_args"]):
            now = dict(self.record["model_args"])
            keys = sorted(k for k in {*args, *now} if args.get(k) != now.get(k))
            fields = sorted({_ARCH_FIELDS.get(k, "`model_args`") for k in keys})
            raise ConfigError(
                "resume",
                f"the state is for model {state.get('model_name')} {args}, not {self.config.model} {now}: "
                f"{', '.join(keys)} differ (set by {', '.join(fields)}), which the weights cannot follow",
            )
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        if state.get("log_window"):
            self._window = dict(state["log_window"]["sums"])
            self._n_window = int(state["log_window"]["steps"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = start = int(state["step"])
        # The schedule is a function of the step and of this run's lr/warmup_steps (which may differ from
        # the state's): fast-forward the LambdaLR to ``start`` instead of loading its state.
        sched = self.lr_scheduler
        sched.last_epoch = start
        for group, base, fn in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
            group["initial_lr"] = base
            group["lr"] = base * fn(start)

    def checked_modules(self) -> dict[str, nn.Module]:
        return {"weights": self.model}

    def nonfinite_cause(self) -> str:
        bad = int((~torch.isfinite(self.x_all.flatten(1))).any(1).sum())
        if bad:
            return f"the data hold non-finite values ({bad} of {len(self.x_all)} samples)"
        return "the training diverged (lower `lr`, or `clip_grad`)"

    # ------------------------------------------------------------------ one step
    def _train_step(self, step: int) -> tuple[dict[str, torch.Tensor], float, torch.Tensor]:
        """Optimizer step ``step`` (0-based): its batch and noise are functions of ``(seed, step, rank)``.

        Returns the losses, the learning rate used and the gradient norm (NaN without clipping)."""
        cfg, ctx = self.config, self.ctx
        torch.manual_seed(derive_seed(cfg.seed, step, ctx.rank))
        idx = batch_indices(len(self.x_all), step, self.per_rank, cfg.seed, ctx.rank, ctx.world_size)
        x, y = self.x_all[idx].to(ctx.device), self.y_all[idx].to(ctx.device)
        lr = self.optimizer.param_groups[0]["lr"]
        losses = diffusion_loss(self.train_model, self.noise_scheduler, x, y, self.model.learn_sigma)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
            if cfg.clip_grad
            else torch.tensor(float("nan"))
        )
        self.optimizer.step()
        self.lr_scheduler.step()
        self.ema.update_parameters(self.model)
        return losses, lr, grad_norm

    def run_unit(self, index: int, progress: Progress) -> dict[str, Any] | None:
        cfg = self.config
        if self._t0 is None:
            self._t0 = self._t_window = time.time()
            self.model.train()
        losses, lr, grad_norm = self._train_step(index)
        self.step = step = index + 1
        values = {k: float(losses[k].detach()) for k in self._window}
        for k, v in values.items():
            self._window[k] += v
        self._n_window += 1
        progress.update(1, loss=values["loss"])
        self._timed_out = cfg.max_minutes > 0 and (time.time() - self._t0) / 60 >= cfg.max_minutes
        if step % cfg.log_every and step != cfg.steps:
            if not math.isfinite(self._window["loss"]):  # the runner's guard stops before anything is written
                return {"step": step, "loss": self._window["loss"]}
            return None
        n, dt = self._n_window, time.time() - self._t_window
        self.last = {k: v / n for k, v in self._window.items()}
        record = {
            "step": step,
            **self.last,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "sec_per_step": dt / n,
            "imgs_per_sec": n * cfg.batch_size / max(dt, 1e-9),
            "elapsed_min": (time.time() - self._t0) / 60,
        }
        self._window = dict.fromkeys(self._window, 0.0)
        self._n_window, self._t_window = 0, time.time()
        return record

    def save_due(self, index: int, last: bool) -> bool:
        return last or (index + 1) % self.config.ckpt_every == 0

    def stop_early(self, index: int, first: int) -> str | None:
        if self._timed_out and index + 1 < self.config.steps:
            return f"max_minutes ({self.config.max_minutes:g}) reached at step {index + 1}"
        return None

    def after_save(self, index: int) -> None:
        """``config.json`` (the run's model, schedule, data and config, readable) and ``loss.png``."""
        text = json.dumps({**self.record, "config": config_dict(self.config)}, indent=2, default=str).encode()
        atomic_write(self.out / "config.json", lambda f: f.write(text))
        plot_metrics(self.out / "metrics.jsonl", self.out / "loss.png", (_LOSS_PANEL,), x="step", x_offset=0)

    # ------------------------------------------------------------------ the end
    def export(self, out: Path, finished: bool) -> dict[str, Any]:
        """The EMA weights as ``ema.safetensors`` and, for pixel data, the sample grid ``samples.png``."""
        summary: dict[str, Any] = {"step": self.step, **self.last}
        if not self.ctx.is_main:
            return summary
        check_finite(self.ema.module, self.step, "EMA weights")
        save_checkpoint(
            self.ema.module,
            out / "ema.safetensors",
            metadata={"gspn.diffusion": json.dumps({"schedule": self.schedule, "data": self.record["data"]})},
        )
        summary["ema"] = str(out / "ema.safetensors")
        cfg = self.config
        if cfg.sample_steps > 0 and self.meta["kind"] == "pixels":  # latents would need the VAE to view
            from .sample import generate, save_images

            n = self.meta["num_classes"]
            labels = [i % n for i in range(min(n, 10) * 8)]
            if not cfg.quiet:
                print(
                    f"sampling the final grid: {len(labels)} images × {cfg.sample_steps} {cfg.sampler} steps "
                    f"→ {out / 'samples.png'}",
                    flush=True,
                )
            imgs = generate(
                self.ema.module,
                self.schedule,
                labels,
                tuple(self.meta["shape"]),
                cfg.sample_steps,
                cfg.sampler,
                cfg.cfg_scale,
                seed=cfg.seed,
                device=self.ctx.device,
                progress=cfg.progress,
            )
            save_images(imgs, out / "samples.png", nrow=min(n, 10))
            summary["samples"] = str(out / "samples.png")
        return summary

    def closing(self, summary: dict[str, Any]) -> str:
        cfg = self.config
        loss = f", loss {self.last['loss']:.4f}" if self.last else ""
        line = f"train-dit: step {self.step}/{cfg.steps}{loss}; outputs in {self.out}"
        if summary.get("stopped"):
            line += f" ({summary['stopped']}: continue it with resume and the same settings)"
        return line


def run(config: DiTTrainConfig) -> dict[str, Any]:
    """Train a GSPN-DiT as ``config`` says (:func:`gspn.training_utils.run` of :class:`DiTTrainRecipe`);
    return the run summary (also ``<output_dir>/summary.json``)."""
    return run_recipe(DiTTrainRecipe(config))
