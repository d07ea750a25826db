r"""Distil a GSPN-swapped Stable Diffusion UNet from the original one.

The *student* is the UNet with every self-attention swapped for GSPN
(:func:`gspn.integrations.diffusers.swap_self_attention`); the *teacher* is the original UNet,
frozen. By default only the GSPN parameters train, and the teacher is the **same** UNet run with
the adapter in teacher mode (the swapped layers fall back to the frozen softmax attention), so no
second copy of the UNet is held in memory. With ``train_all`` the whole UNet trains and the teacher
is a frozen copy.

Loss per step, on noisy latents ``x_t`` at uniform random timesteps (the paper's recipe, weights
configurable)::

    L = w_noise · MSE(student(x_t), target)            # target: ε or v (scheduler's prediction type)
      + w_out   · MSE(student(x_t), teacher(x_t))
      + w_feat  · mean_l MSE(student_l(x_t), teacher_l(x_t))   # outputs of each swapped attn1 layer

with the paper's weights ``w_noise = 1, w_out = 0.5, w_feat = 0.5``. The noise term needs real
images (an image-caption folder); with a caption file only, ``x_0`` is a Gaussian latent and the
noise term is dropped (the teacher is the only supervision).

Randomness is derived per step from ``(seed, step, rank)``, so a resumed run draws exactly the
batches, timesteps and noise the uninterrupted run would have. Checkpoints
(``checkpoint.pt``: the training kit's one state format, :func:`gspn.training_utils.training_state`,
with the trainable weights under ``model``, the optimiser, LR schedule, step and RNG states) are written
atomically (temporary file + ``os.replace``), and the adapter is saved with ``save_pretrained`` to
``<output_dir>/adapter`` (directory swapped in atomically). Every ``log_every`` steps rank 0 appends
``{"step", loss parts, "grad_norm", "loss", "lr", "steps_per_sec"}`` to ``<output_dir>/metrics.jsonl``
(the kit's metrics log, as in the other recipes); a resumed run first drops the records past its
checkpoint.

Multi-GPU: launch with ``torchrun`` or ``accelerate launch`` (both set ``RANK``/``WORLD_SIZE``);
the student forward runs through :class:`torch.nn.parallel.DistributedDataParallel`, which averages
the gradients of the trainable parameters, as in the other recipes.

The recipe's entry point is :func:`run` of a :class:`DistillConfig` (``gspn distill`` builds it from
its flags); it is written on the training kit :mod:`gspn.training_utils` (state format, RNG capture,
seeding rule, LR schedule, distributed set-up).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._files import check_output_dir, claim_run_dir
from .._validate import check_int, check_number
from ..integrations.diffusers import GSPNAdapter, swap_self_attention
from ..training_utils import (
    all_gather_objects,
    append_metrics,
    build_lr_scheduler,
    capture_rng,
    cleanup_distributed,
    init_distributed,
    load_state,
    restore_rank_rng,
    save_state,
    step_generator,
    training_state,
    truncate_metrics,
)
from .data import CaptionData, load_captions, load_image

__all__ = ["DistillConfig", "Distiller", "distill", "run", "validate"]

CHECKPOINT_NAME = "checkpoint.pt"
ADAPTER_DIR = "adapter"
METRICS_NAME = "metrics.jsonl"
#: The files a distillation run writes in its output folder.
RUN_FILES = (CHECKPOINT_NAME, ADAPTER_DIR, METRICS_NAME)


@dataclass
class DistillConfig:
    """Settings of a distillation run (the ``gspn distill`` options)."""

    model: str = ""
    captions: str = ""
    output_dir: str = "gspn-distill"
    resolution: int = 512
    batch_size: int = 1
    steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine
    max_grad_norm: float = 1.0
    noise_weight: float = 1.0
    output_weight: float = 0.5
    feature_weight: float = 0.5
    caption_dropout: float = 0.0
    seed: int = 0
    save_every: int = 500
    log_every: int = 10
    resume: bool = True
    overwrite: bool = False  # with resume=False: replace the run already in output_dir
    mixed_precision: str = "no"  # no | bf16
    gradient_checkpointing: bool = False
    train_all: bool = False
    device: str | None = None
    gspn: dict[str, Any] = field(default_factory=dict)  # swap_self_attention options
    init_adapter: str | None = None  # start from this saved adapter (used by :func:`run`)
    threads: int = 0  # torch intra-op threads (0: torch's default; used by :func:`run`)


def validate(cfg: DistillConfig) -> None:
    """Reject nonsense settings before any work (one ``ValueError`` naming the ``gspn distill`` flag)."""
    for flag, value in (
        ("steps", cfg.steps),
        ("batch_size", cfg.batch_size),
        ("image_size", cfg.resolution),
        ("log_every", cfg.log_every),
        ("d_state", cfg.gspn.get("d_state", 1)),
    ):
        check_int(flag, value)
    for flag, value in (
        ("save_every", cfg.save_every),
        ("warmup_steps", cfg.warmup_steps),
        ("kernel_size", cfg.gspn.get("kernel_size", 0)),
        ("threads", cfg.threads),
    ):
        check_int(flag, value, minimum=0)
    check_number("lr", cfg.lr, 0, lo_open=True)
    check_number("clip_grad", cfg.max_grad_norm, 0, allow_none=True)
    for name in ("weight_decay", "noise_weight", "output_weight", "feature_weight"):
        check_number(name, getattr(cfg, name), 0)
    check_number("caption_dropout", cfg.caption_dropout, 0, 1)
    check_output_dir(cfg.output_dir)


def _atomic_save_dir(save: Callable[[Path], None], path: Path) -> None:
    """``save(tmp_dir)`` then swap ``tmp_dir`` in for ``path`` (the old one is removed after)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    old = path.with_name(f".{path.name}.old{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_pipeline(model: str, device: torch.device | str = "cpu") -> Any:
    """A diffusers text-to-image pipeline from a local folder or a hub name (no safety checker).

    Hub names resolve through the local Hugging Face cache; set ``HF_HUB_OFFLINE=1`` to forbid
    any network access.
    """
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    return pipe.to(device)


class Distiller:
    """The distillation loop; see the module docstring.

    Args:
        cfg: the run's settings.
        pipe: an already-built pipeline (tests, notebooks); otherwise ``cfg.model`` is loaded.
        data: captions/images; otherwise read from ``cfg.captions``.
        adapter: start from this adapter (e.g. a previous run's) instead of a fresh swap.
    """

    def __init__(
        self,
        cfg: DistillConfig,
        pipe: Any = None,
        data: CaptionData | None = None,
        adapter: GSPNAdapter | None = None,
    ) -> None:
        from diffusers import DDPMScheduler

        self.cfg = cfg
        ctx = init_distributed(cfg.device or "auto")
        self.ctx = ctx
        self.rank, self.world, self.device = ctx.rank, ctx.world_size, ctx.device
        self.pipe = pipe if pipe is not None else load_pipeline(cfg.model, self.device)
        self.pipe.to(self.device)
        self.data = data if data is not None else load_captions(cfg.captions)
        if not (cfg.output_weight or cfg.feature_weight or (cfg.noise_weight and self.data.has_images)):
            raise ValueError(
                "every loss term is off (a caption file has no noise term): set --output-weight or --feature-weight"
            )
        self.unet: nn.Module = self.pipe.unet
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        for name in ("vae", "text_encoder", "text_encoder_2"):
            module = getattr(self.pipe, name, None)
            if module is not None:
                module.requires_grad_(False).eval()
        self.unet.requires_grad_(False)
        self.teacher: nn.Module | None = copy.deepcopy(self.unet).eval() if cfg.train_all else None
        if adapter is not None:
            self.adapter = adapter.mount(self.unet)
        else:
            torch.manual_seed(cfg.seed)  # the GSPN initialisation is reproducible
            self.adapter = swap_self_attention(self.unet, **cfg.gspn)
        if cfg.train_all:
            self.unet.requires_grad_(True)
            self.params = [p for p in self.unet.parameters() if p.requires_grad]
        else:
            self.adapter.requires_grad_(True)
            self.params = list(self.adapter.parameters())
        self.unet.train()
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        # the student runs through DDP under torchrun: it averages the trainable parameters' gradients
        self.student: nn.Module = self.unet
        if self.world > 1:
            self.student = nn.parallel.DistributedDataParallel(
                self.unet, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.lr_schedule, cfg.steps, cfg.warmup_steps)
        self.step = 0
        self._feats: dict[str, torch.Tensor] | None = None
        self._handles = []
        self._feature_hooks()

    # ------------------------------------------------------------------ setup helpers
    def _feature_hooks(self) -> None:
        if not self.cfg.feature_weight:
            return
        layers = self.adapter.layer_modules()
        modules = dict(layers)
        if self.teacher is not None:
            modules.update({f"teacher:{p}": self.teacher.get_submodule(p) for p in layers})

        def make(name: str) -> Callable[..., None]:
            key = name.removeprefix("teacher:")

            def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                if self._feats is not None:
                    self._feats[key] = output

            return hook

        for name, module in modules.items():
            self._handles.append(module.register_forward_hook(make(name)))

    def close(self) -> None:
        """Remove the feature hooks (the adapter stays mounted)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ data
    def _generator(self, step: int) -> torch.Generator:
        return step_generator(self.cfg.seed, step, self.rank)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """Text embeddings (and SD-XL's added conditions) for ``prompts``."""
        out = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        embeds = out[0]
        added = None
        if getattr(self.unet.config, "addition_embed_type", None) == "text_time":
            pooled = out[2]
            res = self.cfg.resolution
            time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=embeds.dtype, device=self.device)
            added = {"text_embeds": pooled, "time_ids": time_ids.expand(len(prompts), -1)}
        return embeds, added

    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of the latents at the training resolution."""
        factor = getattr(self.pipe, "vae_scale_factor", 8)
        side = self.cfg.resolution // factor
        return int(self.unet.config.in_channels), side, side

    @torch.no_grad()
    def make_batch(self, step: int) -> dict[str, Any]:
        """The batch of ``step`` (deterministic in ``(seed, step, rank)``)."""
        cfg, gen = self.cfg, self._generator(step)
        idx = torch.randint(len(self.data), (cfg.batch_size,), generator=gen).tolist()
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout
        prompts = ["" if d else self.data.captions[i] for i, d in zip(idx, drop.tolist(), strict=True)]
        shape = (cfg.batch_size, *self.latent_shape())
        if self.data.has_images:
            vae = self.pipe.vae
            images = torch.stack([load_image(self.data.images[i], cfg.resolution) for i in idx])
            dist_ = vae.encode(images.to(self.device, vae.dtype)).latent_dist
            eps = torch.randn(dist_.mean.shape, generator=gen).to(self.device, dist_.mean.dtype)
            latents = (dist_.mean + dist_.std * eps) * vae.config.scaling_factor
            latents = latents.float()
        else:
            latents = torch.randn(shape, generator=gen).to(self.device)
        noise = torch.randn(latents.shape, generator=gen).to(self.device)
        num_t = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, num_t, (cfg.batch_size,), generator=gen).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        embeds, added = self.encode_prompts(prompts)
        return {
            "noisy": noisy,
            "t": t,
            "target": target,
            "embeds": embeds,
            "added": added,
            "real": self.data.has_images,
        }

    # ------------------------------------------------------------------ loss
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.mixed_precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """The distillation loss of ``batch`` and its parts (floats)."""
        cfg = self.cfg
        args = (batch["noisy"], batch["t"], batch["embeds"])
        kwargs = {"added_cond_kwargs": batch["added"]} if batch["added"] is not None else {}
        need_teacher = bool(cfg.output_weight or cfg.feature_weight)
        teacher_feats: dict[str, torch.Tensor] = {}
        teacher_out = None
        with self._autocast():
            if need_teacher:
                self._feats = teacher_feats
                with torch.no_grad():
                    if self.teacher is not None:
                        teacher_out = self.teacher(*args, **kwargs).sample
                    else:
                        with self.adapter.teacher_mode():
                            teacher_out = self.unet(*args, **kwargs).sample
            student_feats: dict[str, torch.Tensor] = {}
            self._feats = student_feats
            out = self.student(*args, **kwargs).sample
            self._feats = None
        out = out.float()
        parts: dict[str, torch.Tensor] = {}
        if cfg.noise_weight and batch["real"]:
            parts["noise"] = F.mse_loss(out, batch["target"].float())
        if cfg.output_weight:
            parts["output"] = F.mse_loss(out, teacher_out.float())
        if cfg.feature_weight and student_feats:
            parts["feature"] = torch.stack(
                [F.mse_loss(student_feats[k].float(), teacher_feats[k].float()) for k in student_feats]
            ).mean()
        weights = {"noise": cfg.noise_weight, "output": cfg.output_weight, "feature": cfg.feature_weight}
        loss = sum(weights[k] * v for k, v in parts.items())
        return loss, {k: float(v.detach()) for k, v in parts.items()}

    # ------------------------------------------------------------------ checkpoints
    @property
    def output_dir(self) -> Path:
        """Where checkpoints and the adapter go."""
        return Path(self.cfg.output_dir)

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        module = self.unet if self.cfg.train_all else self.adapter
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}

    def save(self) -> None:
        """Write ``checkpoint.pt`` (the kit's training state: ``model`` holds the trainable weights) and
        ``adapter/`` atomically. Called on every rank (the RNG states are gathered); rank 0 writes."""
        rngs = all_gather_objects(capture_rng(), self.ctx)
        if self.rank != 0:
            return
        bad = [
            n for n, t in self._trainable_state().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())
        ]
        if bad:
            raise FloatingPointError(
                f"non-finite weights at step {self.step} (e.g. {bad[0]}); stopped before writing: "
                f"{self.output_dir} keeps the last good state (lower --lr)"
            )
        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        state = training_state(
            model=self._trainable_state(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.lr_scheduler.state_dict(),
            step=self.step,
            rng=rngs,
            config=asdict(self.cfg),
        )
        save_state(out / CHECKPOINT_NAME, state)
        _atomic_save_dir(lambda p: self.adapter.save_pretrained(p), out / ADAPTER_DIR)

    def load(self, path: str | os.PathLike | None = None) -> bool:
        """Resume from ``checkpoint.pt`` (default: in ``output_dir``; files with the older key names
        ``trainable``/``lr_scheduler`` are read too); returns whether one was found."""
        path = Path(path) if path is not None else self.output_dir / CHECKPOINT_NAME
        if not path.is_file():
            return False
        state = load_state(path)
        module = self.unet if self.cfg.train_all else self.adapter
        module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        restore_rank_rng(state["rng"], self.rank, self.world)
        return True

    # ------------------------------------------------------------------ loop
    def train_step(self) -> dict[str, float]:
        """One optimisation step on the batch of the current step; returns the loss parts."""
        batch = self.make_batch(self.step)
        loss, parts = self.compute_loss(batch)
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(
                f"non-finite loss at step {self.step + 1} ({parts}); stopped before writing: "
                f"{self.output_dir} keeps the last good state (lower --lr)"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.max_grad_norm:
            parts["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
        self.optimizer.step()
        self.lr_scheduler.step()
        self.step += 1
        parts["loss"] = float(loss.detach())
        return parts

    def train(self, log: Callable[[str], None] | None = print) -> list[dict[str, float]]:
        """Run (or resume) until ``cfg.steps``; returns the per-step loss parts of this call."""
        cfg = self.cfg
        run_dir = (
            claim_run_dir(self.output_dir, RUN_FILES, resume=cfg.resume, overwrite=cfg.overwrite)
            if self.rank == 0
            else None
        )
        try:
            return self._train(log)
        finally:
            if run_dir is not None:
                run_dir.release()

    def _train(self, log: Callable[[str], None] | None) -> list[dict[str, float]]:
        cfg = self.cfg
        if cfg.resume and self.load() and log and self.rank == 0:
            log(f"resumed from {self.output_dir / CHECKPOINT_NAME} at step {self.step}")
        metrics = self.output_dir / METRICS_NAME
        if self.rank == 0:  # records past the checkpoint being resumed belong to a run that was cut short
            truncate_metrics(metrics, self.step, key="step")
        history = []
        start = time.perf_counter()
        while self.step < cfg.steps:
            lr = self.lr_scheduler.get_last_lr()[0]
            parts = self.train_step()
            history.append(parts)
            if self.rank == 0 and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                rate = len(history) / (time.perf_counter() - start)
                append_metrics(metrics, {"step": self.step, **parts, "lr": lr, "steps_per_sec": rate})
                if log:
                    text = " ".join(f"{k}={v:.4g}" for k, v in parts.items())
                    log(
                        f"step {self.step}/{cfg.steps} {text} lr={self.lr_scheduler.get_last_lr()[0]:.3g} "
                        f"({rate:.2f} it/s)"
                    )
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.save()
        self.save()
        return history


def distill(
    cfg: DistillConfig, pipe: Any = None, data: CaptionData | None = None, adapter: GSPNAdapter | None = None
) -> Distiller:
    """Build a :class:`Distiller`, train it to ``cfg.steps`` and return it."""
    distiller = Distiller(cfg, pipe=pipe, data=data, adapter=adapter)
    distiller.train()
    return distiller


def run(config: DistillConfig) -> dict[str, Any] | None:
    """The distillation recipe's entry point (``gspn distill``): validate ``config``, build a
    :class:`Distiller` (from ``config.init_adapter`` if set), train it to ``config.steps``.

    Returns the summary (final step, adapter folder, last loss parts) on rank 0, ``None`` elsewhere."""
    validate(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    adapter = GSPNAdapter.from_pretrained(config.init_adapter) if config.init_adapter else None
    ok = False
    try:
        distiller = Distiller(config, adapter=adapter)
        history = distiller.train()
        summary = None
        if distiller.rank == 0:
            last = history[-1] if history else {}
            summary = {"step": distiller.step, "adapter": str(distiller.output_dir / ADAPTER_DIR), **last}
        ok = True
        return summary
    finally:
        cleanup_distributed(ok)
