r"""Distil a GSPN-swapped Stable Diffusion UNet from the original one (``gspn distill``), on the kit's runner.

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
batches, timesteps and noise the uninterrupted run would have. One unit of the runner
(:func:`gspn.training_utils.run`) is one optimizer step: the runner owns the folder, resume, the
non-finite guard, ``metrics.jsonl`` (a record every ``log_every`` steps: step, loss parts,
``grad_norm``, ``loss``, ``lr``, ``steps_per_sec``) and ``last.pt`` (the kit's one state format, the
trainable weights under ``model``; every ``save_every`` steps and at the end). Each saved state is
followed by ``<output_dir>/adapter`` (``save_pretrained``, the folder swapped in atomically).

Multi-GPU: launch with ``torchrun`` or ``accelerate launch`` (both set ``RANK``/``WORLD_SIZE``); the
student forward runs through :class:`torch.nn.parallel.DistributedDataParallel`, which averages the
gradients of the trainable parameters.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..._validate import check_choice, check_int, check_number
from ...training_utils import (
    SCHEDULES,
    ConfigError,
    DistContext,
    Progress,
    Recipe,
    RunConfig,
    autocast_dtype,
    build_lr_scheduler,
    step_generator,
)
from ...training_utils import run as run_recipe
from .data import CaptionData, load_captions, load_image

__all__ = ["ADAPTER_DIR", "UNetDistillationConfig", "UNetDistillationRecipe", "run"]

#: The adapter folder (``GSPNAdapter.save_pretrained``) in the output folder.
ADAPTER_DIR = "adapter"
#: The training state's name before the runner (``checkpoint.pt``): ``resume="auto"`` still finds it.
LEGACY_STATE = "checkpoint.pt"


@dataclass
class UNetDistillationConfig(RunConfig):
    """Everything one distillation run depends on; each field is the ``gspn distill`` flag of its name
    (``gspn distill --help`` documents them). ``d_state``, ``expand``, ``kernel_size``, ``chunk_size``
    and ``gate_channels`` are the GSPN layers' options (:meth:`GSPNAdapter.from_unet`)."""

    output_dir: str = "gspn-distill"
    model: str = ""
    captions: str = ""
    init_adapter: str | None = None
    image_size: int = 512
    caption_dropout: float = 0.0
    d_state: int = 8
    expand: float = 1.0
    kernel_size: int = 3
    chunk_size: int | None = None
    gate_channels: int | None = None
    steps: int = 1000
    batch_size: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    clip_grad: float | None = 1.0
    noise_weight: float = 1.0
    output_weight: float = 0.5
    feature_weight: float = 0.5
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    train_all: bool = False
    save_every: int = 500
    log_every: int = 10

    def gspn_options(self) -> dict[str, Any]:
        """The options of :func:`~gspn.integrations.diffusers.swap_self_attention`."""
        return {
            "d_state": self.d_state,
            "expand": self.expand,
            "kernel_size": self.kernel_size,
            "chunk_size": self.chunk_size,
            "gate_channels": self.gate_channels,
        }


def check_config(cfg: UNetDistillationConfig) -> None:
    """Reject settings that cannot train, before any work (one :class:`ConfigError` naming the field)."""
    for name in ("steps", "batch_size", "image_size", "log_every", "d_state"):
        check_int(name, getattr(cfg, name))
    for name in ("save_every", "warmup_steps", "kernel_size"):
        check_int(name, getattr(cfg, name), minimum=0)
    for name in ("chunk_size", "gate_channels"):
        check_int(name, getattr(cfg, name), allow_none=True)
    for name in ("lr", "expand"):
        check_number(name, getattr(cfg, name), 0, lo_open=True)
    for name in ("weight_decay", "noise_weight", "output_weight", "feature_weight"):
        check_number(name, getattr(cfg, name), 0)
    check_number("clip_grad", cfg.clip_grad, 0, allow_none=True)
    check_number("caption_dropout", cfg.caption_dropout, 0, 1)
    check_choice("lr_schedule", cfg.lr_schedule, SCHEDULES)
    if cfg.precision not in ("fp32", "bf16"):
        raise ConfigError("precision", f"must be fp32 or bf16 (autocast of the forward passes), not {cfg.precision!r}")
    if cfg.init_adapter and not Path(cfg.init_adapter).is_dir():
        raise ConfigError("init_adapter", f"names no saved adapter folder: {cfg.init_adapter}")


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


class UNetDistillationRecipe(Recipe):
    """Distillation of a GSPN-swapped UNet, one runner unit per optimizer step (see the module docstring).

    Args:
        config: the run's settings.
        pipe: an already-built pipeline (tests, notebooks); otherwise ``config.model`` is loaded.
        data: captions/images; otherwise read from ``config.captions``.
        adapter: start from this adapter (e.g. a previous run's) instead of ``config.init_adapter`` or a
            fresh swap.

    :meth:`build` may be called by hand before :func:`gspn.training_utils.run` (to look at batches or
    losses first): the run then uses the recipe as built. :attr:`history` holds the loss parts of every
    step this invocation trained.
    """

    command: ClassVar[str] = "distill"
    stateful: ClassVar[bool] = True
    unit: ClassVar[str] = "step"
    loss_key: ClassVar[str] = "loss"
    free_fields: ClassVar[frozenset[str]] = frozenset({"save_every", "log_every", "init_adapter"})
    run_files: ClassVar[tuple[str, ...]] = ("last.pt", LEGACY_STATE, ADAPTER_DIR, "metrics.jsonl", "summary.json")
    resume_files: ClassVar[tuple[str, ...]] = ("last.pt", LEGACY_STATE)

    config: UNetDistillationConfig

    def __init__(
        self,
        config: UNetDistillationConfig,
        pipe: Any = None,
        data: CaptionData | None = None,
        adapter: Any = None,
    ) -> None:
        super().__init__(config)
        self.pipe, self.data, self._init_adapter = pipe, data, adapter
        self.history: list[dict[str, float]] = []
        self.step = 0
        self.built = False
        self._adapter_step: int | None = None
        self._bad_batch = False
        self._t0: float | None = None
        self._feats: dict[str, torch.Tensor] | None = None
        self._handles: list[Any] = []

    # ------------------------------------------------------------------ before anything is written
    def check(self) -> None:
        cfg = self.config
        check_config(cfg)
        if self.pipe is None and not cfg.model:
            raise ConfigError("model", "is required: a diffusers pipeline folder or hub name")
        self._load_data()

    def _load_data(self) -> CaptionData:
        """The captions (read once), checked against the loss weights: some loss term must be on."""
        cfg = self.config
        if self.data is None:
            if not cfg.captions:
                raise ConfigError("captions", "is required: a caption file or an image-caption folder")
            try:
                self.data = load_captions(cfg.captions)
            except (OSError, ValueError) as exc:
                raise ConfigError("captions", f"cannot be read: {exc}") from None
        if not (cfg.output_weight or cfg.feature_weight or (cfg.noise_weight and self.data.has_images)):
            raise ConfigError(
                "output_weight",
                "and `feature_weight` are 0 and a caption file has no noise term: every loss term is off",
            )
        return self.data

    def resume_note(self, changed: dict[str, tuple[Any, Any]]) -> str | None:
        if "steps" not in changed:
            return None
        was, now = changed["steps"]
        if self.config.lr_schedule == "constant":
            return f"the learning rate stays constant after the warm-up: the run goes on to step {now}"
        lr = self.lr_scheduler.base_lrs[0] * self.lr_scheduler.lr_lambdas[0](self.step)
        return (
            f"the cosine learning-rate schedule now spans {now} steps instead of {was}: it continues at {lr:.3g}, "
            f"its value for step {self.step} of the longer schedule"
        )

    # ------------------------------------------------------------------ build
    def build(self, ctx: DistContext) -> None:
        """Pipeline, data, teacher and student, feature hooks, optimizer and schedule (once: a recipe built
        by hand keeps what it built)."""
        self.ctx = ctx
        if self.built:
            return
        from diffusers import DDPMScheduler

        from ...integrations.diffusers import GSPNAdapter, swap_self_attention
        from ...integrations.generate import load_pipeline

        cfg, device = self.config, ctx.device
        self.device = device
        self.pipe = self.pipe if self.pipe is not None else load_pipeline(cfg.model, device)
        self.pipe.to(device)
        self._load_data()
        self.unet: nn.Module = self.pipe.unet
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        for name in ("vae", "text_encoder", "text_encoder_2"):
            module = getattr(self.pipe, name, None)
            if module is not None:
                module.requires_grad_(False).eval()
        self.unet.requires_grad_(False)
        self.teacher: nn.Module | None = copy.deepcopy(self.unet).eval() if cfg.train_all else None
        adapter = self._init_adapter
        if adapter is None and cfg.init_adapter:
            adapter = GSPNAdapter.from_pretrained(cfg.init_adapter)
        if adapter is not None:
            self.adapter = adapter.mount(self.unet)
        else:
            torch.manual_seed(cfg.seed)  # the GSPN initialisation is reproducible
            self.adapter = swap_self_attention(self.unet, **cfg.gspn_options())
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
        if ctx.distributed:
            self.student = nn.parallel.DistributedDataParallel(
                self.unet, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.lr_schedule, cfg.steps, cfg.warmup_steps)
        self.amp_dtype = autocast_dtype(cfg.precision, device)
        self._feature_hooks()
        self.built = True

    def _feature_hooks(self) -> None:
        if not self.config.feature_weight:
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

    def num_units(self) -> int:
        return self.config.steps

    def header(self) -> str:
        cfg, data = self.config, self.data
        trained = "the whole UNet" if cfg.train_all else f"{len(self.adapter.processors)} GSPN layers"
        n_params = sum(p.numel() for p in self.params)
        source = f"{len(data)} captions" + (" with images" if data.has_images else " (no images: no noise term)")
        return (
            f"distill {cfg.model or type(self.pipe).__name__}: {trained}, {n_params / 1e6:.3f}M trainable params | "
            f"{source}, {cfg.image_size}px | {self.ctx.world_size} process(es) on {self.ctx.device.type} | "
            f"{cfg.steps} steps × batch {cfg.batch_size}"
        )

    # ------------------------------------------------------------------ data
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
            res = self.config.image_size
            time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=embeds.dtype, device=self.device)
            added = {"text_embeds": pooled, "time_ids": time_ids.expand(len(prompts), -1)}
        return embeds, added

    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of the latents at the training size."""
        factor = getattr(self.pipe, "vae_scale_factor", 8)
        side = self.config.image_size // factor
        return int(self.unet.config.in_channels), side, side

    @torch.no_grad()
    def make_batch(self, step: int) -> dict[str, Any]:
        """The batch of ``step`` (deterministic in ``(seed, step, rank)``)."""
        cfg, data = self.config, self.data
        gen = step_generator(cfg.seed, step, self.ctx.rank)
        idx = torch.randint(len(data), (cfg.batch_size,), generator=gen).tolist()
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout
        prompts = ["" if d else data.captions[i] for i, d in zip(idx, drop.tolist(), strict=True)]
        shape = (cfg.batch_size, *self.latent_shape())
        if data.has_images:
            vae = self.pipe.vae
            images = torch.stack([load_image(data.images[i], cfg.image_size) for i in idx])
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
        return {"noisy": noisy, "t": t, "target": target, "embeds": embeds, "added": added, "real": data.has_images}

    # ------------------------------------------------------------------ loss
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is not None:
            return torch.autocast(self.device.type, dtype=self.amp_dtype)
        return contextlib.nullcontext()

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """The distillation loss of ``batch`` and its parts (floats)."""
        cfg = self.config
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

    # ------------------------------------------------------------------ one step
    def run_unit(self, index: int, progress: Progress) -> dict[str, Any] | None:
        """Optimizer step ``index`` on its batch; the metrics record every ``log_every`` steps and at the end
        (a non-finite loss is returned at once, before the weights are touched)."""
        cfg = self.config
        if self._t0 is None:
            self._t0 = time.perf_counter()
        lr = self.lr_scheduler.get_last_lr()[0]
        batch = self.make_batch(index)
        loss, parts = self.compute_loss(batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            self._bad_batch = not all(
                bool(torch.isfinite(v).all()) for v in (batch["noisy"], batch["target"], batch["embeds"])
            )
            return {"step": index + 1, **parts, "loss": value}
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad:
            parts["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_grad))
        self.optimizer.step()
        self.lr_scheduler.step()
        self.step = index + 1
        parts["loss"] = value
        self.history.append(parts)
        progress.update(1, loss=value)
        if self.step % cfg.log_every and self.step != cfg.steps:
            return None
        rate = len(self.history) / (time.perf_counter() - self._t0)
        text = " ".join(f"{k}={v:.4g}" for k, v in parts.items())
        progress.write(
            f"step {self.step}/{cfg.steps} {text} lr={self.lr_scheduler.get_last_lr()[0]:.3g} ({rate:.2f} it/s)"
        )
        return {"step": self.step, **parts, "lr": lr, "steps_per_sec": rate}

    def save_due(self, index: int, last: bool) -> bool:
        every = self.config.save_every
        return last or bool(every and (index + 1) % every == 0)

    def after_save(self, index: int) -> None:
        """The adapter folder of the state just written."""
        self._save_adapter()

    def _save_adapter(self) -> None:
        _atomic_save_dir(lambda p: self.adapter.save_pretrained(p), self.out / ADAPTER_DIR)
        self._adapter_step = self.step

    # ------------------------------------------------------------------ state
    def _trainable(self) -> nn.Module:
        return self.unet if self.config.train_all else self.adapter

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": {k: v.detach().cpu() for k, v in self._trainable().state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.lr_scheduler.state_dict(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._trainable().load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])

    def checked_modules(self) -> dict[str, nn.Module]:
        return {"trained weights": self._trainable()}

    def nonfinite_cause(self) -> str:
        if self._bad_batch:
            return "non-finite values in the batch (latents, noise or text embeddings)"
        return "the training diverged (lower lr or set clip_grad)"

    # ------------------------------------------------------------------ the end
    def export(self, out: Path, finished: bool) -> dict[str, Any]:
        """The adapter folder (if no save of this invocation wrote it yet); the summary: the final step,
        the adapter folder and the last step's loss parts."""
        if self.ctx.is_main and self._adapter_step != self.step:
            self._save_adapter()
        return {"step": self.step, "adapter": str(out / ADAPTER_DIR), **(self.history[-1] if self.history else {})}

    def closing(self, summary: dict[str, Any]) -> str:
        loss = summary.get("loss")
        last = f"; last loss {loss:.4g}" if isinstance(loss, float) else ""
        return f"distilled {self.step}/{self.config.steps} steps{last}; adapter in {self.out / ADAPTER_DIR}"


def run(config: UNetDistillationConfig) -> dict[str, Any]:
    """Distil as ``config`` says (:func:`gspn.training_utils.run` of :class:`UNetDistillationRecipe`);
    return the run summary (also ``<output_dir>/summary.json``)."""
    return run_recipe(UNetDistillationRecipe(config))
