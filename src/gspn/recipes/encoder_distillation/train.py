r"""Cross-operator distillation of an attention encoder into an isotropic GSPN encoder, on the kit's runner.

C-GSPN (arXiv 2606.00746) trains its GSPN encoder from an attention teacher in two stages: first
*module-wise supervision* (each GSPN block learns to reproduce its attention block's output), then
*end-to-end alignment* of the final features. The paper releases no code and gives no losses or
schedules; this recipe is our implementation of those two stages on the training kit
(:mod:`gspn.training_utils`) and the bundled data:

**Stage 1** (``stage1_epochs`` epochs), per-layer supervision. Student block ``i`` is matched to
teacher block ``j(i) = round((i + 1)·Dt / Ds) − 1`` (one-to-one when the depths ``Ds``, ``Dt`` agree)::

    L1 = mean_i  nmse(A_i(s_i), t_j(i))           nmse(s, t) = mean((s − t)²) / mean(t²)

on the tokens ``(B, N, C)`` of the block outputs; ``A_i`` is a learned ``Linear(Cs → Ct)`` when the
widths differ (identity otherwise). ``stage1_inputs="student"`` (default): the student runs its own
forward and every block output is supervised (gradients reach the earlier blocks too).
``"teacher"``: each student block runs on the teacher's previous block output (block 0 on the
student's patch embedding) — the blocks learn independently, as drop-in replacements of the
attention blocks (needs a :class:`~gspn.models.GSPNViT` student of the teacher's width and depth).

**Stage 2** (the remaining ``epochs − stage1_epochs`` epochs), end-to-end::

    L2 = output_weight · nmse(A(s_final), t_final)                 (final features before the head)
       + kd_weight     · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))   (Hinton et al. 2015)
       + label_weight  · CE(z_s, y)                                (label-smoothed)
       + feature_weight · L1                                       (default 0: off)

where ``z`` are logits (the teacher's from its own head).

**Ours** (not in the paper): the normalised MSE (each layer's error relative to its target's mean
square, so deep layers with large activations do not dominate; ``feature_loss="mse"`` for the plain
one), the layer map and linear adapters, the logit KD and label terms of stage 2 and their weights,
one AdamW + warm-up/cosine schedule per stage, and initialising the student's patch embedding and
head from the teacher's where the shapes match (``init_from_teacher``).

**The teacher protocol.** Any ``nn.Module`` with timm's
``forward_intermediates(x) -> (final, [block outputs])``: ``final`` and each block output a
``(B, C, h, w)`` token grid or ``(B, N, C)`` tokens (no prefix tokens) on the student's grid, for
every block in order; plus ``forward_head(final) -> (B, num_classes)`` logits when ``kd_weight > 0``.
The registered ``vit_*`` models (and ``gspn_vit_*``) have both. The teacher is frozen and in eval mode.

The teacher of a ``teacher`` setting is a ``model.safetensors`` written by ``gspn train --model vit_nano``
(or a run folder holding one) or that run's ``last.pt`` / ``best.pt`` (:func:`.protocol.load_teacher`);
its recorded data setup (image size, channels, mean/std) becomes the student's. The student is a
registered classifier (``gspn_vit_nano`` by default); its final weights are exported to
``<output_dir>/model.safetensors``, loadable with :func:`gspn.models.load_model`.

One unit of the runner (:func:`gspn.training_utils.run`) is one epoch; the stage switch happens at
``stage1_epochs`` (a fresh AdamW and schedule for stage 2). The runner owns the folder, resume, the loop,
the non-finite guard, ``metrics.jsonl`` (each record with its ``stage``) and ``last.pt`` (the kit's one
format: ``model`` is the student with its adapters); this module adds the plot and the exported student.
Under ``torchrun`` each process trains on its shard and DDP averages the gradients; rank 0 writes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..._validate import check_choice, check_int, check_number
from ...datasets import build_data
from ...training_utils import (
    STATE_FORMAT,
    ConfigError,
    DistContext,
    Panel,
    Progress,
    all_reduce_sum,
    autocast_dtype,
    build_lr_scheduler,
    evaluate,
    model_from_config,
    param_groups,
    plot_metrics,
    seed_all,
    sync_buffers,
    weights_digest,
)
from ...training_utils import run as run_recipe
from ...training_utils.supervised import EpochRecipe, EpochRunConfig, check_epoch_config, save_classifier
from .protocol import Distiller, block_outputs, layer_map, load_teacher

__all__ = ["EncoderDistillationConfig", "EncoderDistillationRecipe", "check_config", "run", "upgrade_legacy_state"]

STAGE1_INPUTS = ("student", "teacher")
FEATURE_LOSSES = ("nmse", "mse")
#: The ``format`` of the states this recipe wrote before the kit's one format (key ``distiller``).
LEGACY_FORMAT = "gspn-distill-encoder-v1"

_PANELS = (
    Panel(
        "distillation losses",
        "loss",
        (
            ("train_layer_loss", "per-layer (nmse)"),
            ("train_output_loss", "final features"),
            ("train_kd_loss", "logit KD"),
            ("train_label_loss", "label CE"),
        ),
        log=True,
    ),
    Panel("student accuracy", "accuracy (%)", (("train_acc", "train"), ("val_acc", "val")), scale=100.0),
)


@dataclass
class EncoderDistillationConfig(EpochRunConfig):
    """Everything one encoder-distillation run depends on; each field is the ``gspn distill-encoder`` flag
    of its name (``gspn distill-encoder --help`` and ``docs/cli.md`` document them).

    ``teacher``: a ``model.safetensors`` path, a run folder or a ``gspn train`` training state (``None``
    only when :func:`run` is given a teacher module); ``model`` / ``model_args``: the registered student
    and its constructor overrides; ``image_size`` / ``in_channels``: ``None`` takes the teacher's recorded
    setup (its normalisation mean/std always apply); ``epochs``: both stages together, ``stage1_epochs``
    of them per-layer.
    """

    output_dir: str = "runs/distill-encoder"
    teacher: str | None = None
    model: str = "gspn_vit_nano"
    in_channels: int | None = None
    epochs: int = 10
    stage1_epochs: int = 3
    stage1_inputs: str = "student"
    feature_loss: str = "nmse"
    feature_weight: float = 0.0
    output_weight: float = 1.0
    kd_weight: float = 1.0
    kd_temperature: float = 2.0
    label_weight: float = 1.0
    init_from_teacher: bool = True


def check_config(cfg: EncoderDistillationConfig, teacher_given: bool = False) -> None:
    """Reject settings that cannot run, before any work (one :class:`ConfigError` naming the field)."""
    if not cfg.teacher and not teacher_given:
        raise ConfigError(
            "teacher",
            "is required: a model.safetensors written by `gspn train`, its run folder, or its last.pt / best.pt",
        )
    check_epoch_config(cfg)
    check_int("stage1_epochs", cfg.stage1_epochs, minimum=0)
    if cfg.stage1_epochs > cfg.epochs:
        raise ConfigError("stage1_epochs", f"({cfg.stage1_epochs}) must not exceed `epochs` ({cfg.epochs})")
    for name in ("lr", "kd_temperature"):
        check_number(name, getattr(cfg, name), 0, lo_open=True)
    for name in ("feature_weight", "output_weight", "kd_weight", "label_weight"):
        check_number(name, getattr(cfg, name), 0)
    check_choice("stage1_inputs", cfg.stage1_inputs, STAGE1_INPUTS)
    check_choice("feature_loss", cfg.feature_loss, FEATURE_LOSSES)
    if cfg.epochs > cfg.stage1_epochs and not (
        cfg.output_weight or cfg.kd_weight or cfg.label_weight or cfg.feature_weight
    ):
        raise ConfigError(
            "stage1_epochs",
            f"({cfg.stage1_epochs}) < `epochs` ({cfg.epochs}) needs a stage-2 loss term: set `output_weight`, "
            "`kd_weight`, `label_weight` or `feature_weight` above 0",
        )


def upgrade_legacy_state(state: dict[str, Any]) -> dict[str, Any]:
    """A state written before this recipe used the kit's one format (``format`` ``gspn-distill-encoder-v1``:
    the student and adapters under ``distiller``, no ``command`` / ``unit``) as it is written now; in
    place, and returned. Other states are returned unchanged."""
    if state.get("format") != LEGACY_FORMAT:
        return state
    state["format"] = STATE_FORMAT
    state["command"] = EncoderDistillationRecipe.command
    state["unit"] = state["epoch"]
    state["model"] = state.pop("distiller")
    if not state.get("scaler"):  # {} of a disabled scaler: None, as the kit writes it
        state["scaler"] = None
    return state


class EncoderDistillationRecipe(EpochRecipe):
    """Two-stage encoder distillation, one unit per epoch (see the module docstring).

    ``teacher``: a module following the teacher protocol instead of ``config.teacher``'s file; the data
    setup then comes from ``config`` (digits defaults).
    """

    command: ClassVar[str] = "distill-encoder"
    stateful: ClassVar[bool] = True

    config: EncoderDistillationConfig

    def __init__(self, config: EncoderDistillationConfig, teacher: nn.Module | None = None) -> None:
        super().__init__(config)
        self._given_teacher = teacher
        self.teacher_meta: dict[str, Any] = {}
        self.stage: int | None = None
        self.step = 0
        self.best_acc, self.best_epoch = -1.0, -1
        self.elapsed = 0.0
        self.record: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------ checks
    def check(self) -> None:
        """Settings, the student's task and the teacher (loaded here, on the CPU: a bad file fails first)."""
        cfg = self.config
        check_config(cfg, teacher_given=self._given_teacher is not None)
        from ...models import get_default_cfg

        task = get_default_cfg(cfg.model).get("task", "classification")
        if task != "classification":
            raise ConfigError("model", f"{cfg.model} is a {task} model; the student must be an encoder/classifier")
        if self._given_teacher is not None:
            self.teacher = self._given_teacher.eval().requires_grad_(False)
        else:
            assert cfg.teacher is not None
            self.teacher, self.teacher_meta = load_teacher(cfg.teacher)
        self.teacher_digest = weights_digest(self.teacher)
        tm = self.teacher_meta
        if cfg.in_channels and tm.get("in_chans") and cfg.in_channels != tm["in_chans"]:
            raise ConfigError("in_channels", f"({cfg.in_channels}) differs from the teacher's ({tm['in_chans']})")

    def upgrade_state(self, state: dict[str, Any]) -> dict[str, Any]:
        return upgrade_legacy_state(state)

    def check_state(self, state: dict[str, Any], path: Path) -> None:
        cfg = self.config
        if "teacher_digest" not in state or "stage" not in state:
            raise ConfigError("resume", f"{path} is not a `gspn {self.command}` training state")
        requested = state.get("model_args_requested", state["config"].get("model_args"))
        if state["model_name"] != cfg.model or requested != cfg.model_args:
            raise ConfigError(
                "resume", f"{path} is for student {state['model_name']} {requested}, not {cfg.model} {cfg.model_args}"
            )
        if state["teacher_digest"] != self.teacher_digest:
            raise ConfigError(
                "resume", f"{path} was distilled from another teacher (its weights differ from `teacher`)"
            )

    def resume_note(self, changed: dict[str, tuple[Any, Any]]) -> str | None:
        if "epochs" not in changed and "stage1_epochs" not in changed:
            return None
        s1, e = self.config.stage1_epochs, self.config.epochs
        spans = f"stage 1 now spans epochs 1-{s1}, stage 2 epochs {s1 + 1}-{e}" if s1 else f"stage 2 now spans all {e}"
        if self.stage is None:  # the next epoch starts a stage: it gets a fresh schedule of its new length
            return f"{spans}; the next stage starts a fresh warm-up/cosine schedule"
        lr = self.optimizer.param_groups[0]["lr"]
        return f"{spans}; stage {self.stage}'s cosine schedule now spans its new length and continues at {lr:.3g}"

    # ------------------------------------------------------------------------------------------ build
    def build(self, ctx: DistContext) -> None:
        """Data, student (initialised from the teacher), adapters, loaders; the stage's optimizer is built
        by the first epoch of the stage (or the resumed state)."""
        cfg, tm, dev = self.config, self.teacher_meta, ctx.device
        self.teacher = self.teacher.to(dev)
        mean, std = tm.get("mean"), tm.get("std")
        in_chans = cfg.in_channels or tm.get("in_chans") or 3
        self.data = data = build_data(
            cfg.data,
            img_size=cfg.image_size or tm.get("img_size"),
            in_chans=in_chans,
            mean=mean if mean and len(mean) == in_chans else None,
            std=std if std and len(std) == in_chans else None,
            train_limit=cfg.train_limit,
            val_limit=cfg.val_limit,
        )
        from ...models import create_model

        seed_all(cfg.seed)
        student = model_from_config(
            create_model, cfg.model, cfg.model_args, num_classes=data.num_classes, in_chans=data.in_chans
        )
        self.student = student.to(dev)
        self.n_params = sum(p.numel() for p in student.parameters())
        self.model_args = dict(getattr(student, "model_args", {}) or cfg.model_args)
        self._check_pair()
        if cfg.init_from_teacher:
            self._init_from_teacher()
        self.module = Distiller(
            self.student,
            self.teacher,
            cfg,
            self.mapping,
            self.s_widths,
            self.t_widths,
            self.s_final,
            self.t_final,
            data.num_classes,
        ).to(dev)
        self.build_loaders(data.train, data.val)
        self.amp_dtype = autocast_dtype(cfg.precision, dev)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.teacher_val = (
            evaluate(self.teacher, self.val_loader, dev, ctx, self.amp_dtype) if self.teacher_logits else None
        )

    def _check_pair(self) -> None:
        """Probe both models on one validation image: protocol, token grids, widths, layer map."""
        cfg = self.config
        x = self.data.val[0][0][None].to(self.ctx.device)
        self.student.eval()
        with torch.no_grad():
            t_final, t_blocks = block_outputs(self.teacher, x, "teacher")
            s_final, s_blocks = block_outputs(self.student, x, "model")
        self.student.train()
        self.teacher_logits = False
        if callable(getattr(self.teacher, "forward_head", None)):
            with torch.no_grad():
                z = self.teacher.forward_head(self.teacher.forward_intermediates(x)[0])
            self.teacher_logits = torch.is_tensor(z) and tuple(z.shape) == (1, self.data.num_classes)
        if cfg.kd_weight > 0 and cfg.epochs > cfg.stage1_epochs and not self.teacher_logits:
            raise ConfigError(
                "kd_weight",
                f"> 0 needs teacher logits over the data's {self.data.num_classes} classes (forward_head(final) -> "
                "(B, classes)), which this teacher does not give; set it to 0",
            )
        if t_final.shape[1] != s_final.shape[1] or any(t.shape[1] != t_final.shape[1] for t in t_blocks):
            raise ConfigError(
                "model",
                f"{cfg.model}: the student's token grid ({s_final.shape[1]} tokens) differs from the teacher's "
                f"({t_final.shape[1]}); use the same patch size (e.g. vit_nano → gspn_vit_nano)",
            )
        self.mapping = layer_map(len(s_blocks), len(t_blocks))
        self.s_widths = [t.shape[-1] for t in s_blocks]
        self.t_widths = [t.shape[-1] for t in t_blocks]
        self.s_final, self.t_final = s_final.shape[-1], t_final.shape[-1]
        if cfg.stage1_inputs == "teacher" and cfg.stage1_epochs > 0:
            from ...models import GSPNViT

            if not isinstance(self.student, GSPNViT):
                raise ConfigError(
                    "stage1_inputs",
                    f"teacher needs a gspn_vit_* student (blocks run on the teacher's block outputs), not {cfg.model}; "
                    "use student",
                )
            if len(s_blocks) != len(t_blocks) or self.s_widths != self.t_widths:
                raise ConfigError(
                    "stage1_inputs",
                    "teacher needs a student of the teacher's depth and width "
                    f"(student {len(s_blocks)}×{self.s_widths[0]}, teacher {len(t_blocks)}×"
                    f"{self.t_widths[0]}); use student",
                )
        self.depths = (len(s_blocks), len(t_blocks))

    def _init_from_teacher(self) -> list[str]:
        """Copy the teacher's patch-embedding and head tensors into the student where names and shapes match."""
        own = self.student.state_dict()
        theirs = self.teacher.state_dict()
        copied = [
            k
            for k, v in theirs.items()
            if k.startswith(("patch_embed.", "head.")) and k in own and own[k].shape == v.shape
        ]
        with torch.no_grad():
            for k in copied:
                own[k].copy_(theirs[k])
        return copied

    def _stage_of(self, epoch: int) -> int:
        return 1 if epoch < self.config.stage1_epochs else 2

    def _build_stage(self, stage: int) -> None:
        """The stage's trainable set, DDP wrapper, AdamW and warm-up/cosine schedule."""
        cfg, ctx, spe = self.config, self.ctx, self.steps
        self.module.set_stage(stage)
        self.ddp: nn.Module = self.module
        if ctx.distributed:
            dev = ctx.device
            self.ddp = nn.parallel.DistributedDataParallel(
                self.module, device_ids=[dev.index] if dev.type == "cuda" else None
            )
        self.optimizer = torch.optim.AdamW(param_groups(self.module, cfg.weight_decay), lr=cfg.lr)
        total = (cfg.stage1_epochs if stage == 1 else cfg.epochs - cfg.stage1_epochs) * spe
        self.scheduler = build_lr_scheduler(
            self.optimizer,
            "cosine",
            total_steps=total,
            warmup_steps=min(round(cfg.warmup_epochs * spe), total),
            min_lr_ratio=cfg.min_lr / cfg.lr,
        )
        self.stage = stage

    def header(self) -> str:
        cfg, data, tv = self.config, self.data, self.teacher_val
        return (
            f"student {cfg.model}: {self.n_params / 1e6:.3f}M params, {self.depths[0]} blocks ← teacher "
            f"{type(self.teacher).__name__} ({self.depths[1]} blocks"
            + (f", val acc {100 * tv['acc']:.2f}%" if tv else "")
            + f") | data {data.source}: {len(data.train)} train / {len(data.val)} val, {data.img_size}px | "
            f"{self.ctx.world_size} process(es) on {self.ctx.device.type} | stage 1: {cfg.stage1_epochs} epochs "
            f"({cfg.stage1_inputs} inputs), stage 2: {cfg.epochs - cfg.stage1_epochs} epochs × {self.steps} steps"
        )

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        assert self.stage is not None
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "step": self.step,
            "stage": self.stage,
            "model_name": self.config.model,
            "model_args": self.model_args,
            "teacher_digest": self.teacher_digest,
            "best_acc": self.best_acc,
            "best_epoch": self.best_epoch,
            "elapsed_s": self.elapsed,
            "world_size": self.ctx.world_size,
            "record": self.record,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Student, adapters, counters and, when the next epoch is of the saved stage, its optimizer,
        schedule and scaler."""
        self.module.load_state_dict(state["model"])
        self.step = state["step"]
        self.best_acc, self.best_epoch = state["best_acc"], state["best_epoch"]
        self.elapsed = state.get("elapsed_s", 0.0)
        self.record = state.get("record") or {}
        start = int(state["unit"] if state.get("unit") is not None else state["epoch"]) + 1
        if start < self.config.epochs and self._stage_of(start) == state["stage"]:
            self._build_stage(state["stage"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler") and self.scaler.is_enabled():
                self.scaler.load_state_dict(state["scaler"])

    def checked_modules(self) -> dict[str, nn.Module]:
        return {"weights": self.module}

    # ------------------------------------------------------------------------------------------ epoch
    def run_unit(self, index: int, progress: Progress) -> dict[str, Any]:
        cfg, ctx, dev = self.config, self.ctx, self.ctx.device
        stage = self._stage_of(index)
        if self.stage != stage:
            self._build_stage(stage)
        t0 = time.perf_counter()
        self.module.reset_sums()
        stats = self.train_epoch(index, progress, self.ddp, self.module.criterion, self.module)
        names = sorted(self.module.sums)
        reduced = all_reduce_sum(
            [stats.loss_sum.item(), float(stats.correct.item()), stats.seen]
            + [self.module.sums[k].item() for k in names],
            ctx,
        )
        loss_sum, correct, seen = reduced[:3]
        parts = dict(zip(names, reduced[3:], strict=True))
        if not math.isfinite(loss_sum):
            return {"epoch": index, "stage": stage, "train_loss": loss_sum / seen}
        train_time = time.perf_counter() - t0
        sync_buffers(self.module, ctx)
        val = evaluate(self.student, self.val_loader, dev, ctx, self.amp_dtype)
        self.elapsed += time.perf_counter() - t0
        if val["acc"] > self.best_acc:
            self.best_acc, self.best_epoch = val["acc"], index
        self.record = {
            "epoch": index,
            "stage": stage,
            "step": self.step,
            "lr": self.scheduler.get_last_lr()[0],
            "train_loss": loss_sum / seen,
            **{f"train_{k}_loss": v / seen for k, v in parts.items()},
            **({"train_acc": correct / seen} if stage == 2 or cfg.stage1_inputs == "student" else {}),
            "val_loss": val["loss"],
            "val_acc": val["acc"],
            "best_acc": self.best_acc,
            "epoch_s": time.perf_counter() - t0,
            "train_imgs_per_s": seen / train_time,
            "elapsed_s": self.elapsed,
        }
        if ctx.is_main:
            loss_txt = " ".join(f"{k} {v / seen:.4f}" for k, v in parts.items())
            progress.write(
                f"stage {stage} epoch {index + 1}/{cfg.epochs} | {loss_txt} | val {val['loss']:.4f} / "
                f"{100 * val['acc']:.2f}% | {self.record['epoch_s']:.1f}s"
            )
        return self.record

    def after_save(self, index: int) -> None:
        if self.config.plot:
            plot_metrics(self.out / "metrics.jsonl", self.out / "metrics.png", _PANELS)

    # ------------------------------------------------------------------------------------------ end
    def export(self, out: Path, finished: bool) -> dict[str, Any]:
        """Rank 0 exports the student once every epoch is done; every rank returns the summary."""
        cfg, ctx = self.config, self.ctx
        digests = self.rank_digests(self.student)
        summary: dict[str, Any] = {
            "model": cfg.model,
            "model_args": self.model_args,
            "params": self.n_params,
            "teacher": cfg.teacher,
            "teacher_val_acc": self.teacher_val["acc"] if self.teacher_val else None,
            "epochs": cfg.epochs,
            "stage1_epochs": cfg.stage1_epochs,
            "epochs_done": self.record.get("epoch", -1) + 1,
            "steps": self.step,
            "world_size": ctx.world_size,
            "best_acc": self.best_acc,
            "best_epoch": self.best_epoch,
            "final": self.record,
            "elapsed_s": self.elapsed,
            "rank_weight_digests": digests,
            "output": str(out),
        }
        if ctx.is_main and finished:
            self._export(out / "model.safetensors")
            summary["weights"] = str(out / "model.safetensors")
        return summary

    def _export(self, path: Path) -> None:
        """The student in the library's weight format, with the data setup as ``gspn.train.*`` metadata
        (the keys ``gspn train`` writes, so a distilled student can itself be a teacher)."""
        data = self.data
        meta = {
            "model_name": self.config.model,
            "model_args": self.model_args,
            "num_classes": data.num_classes,
            "in_chans": data.in_chans,
            "img_size": data.img_size,
            "mean": data.mean,
            "std": data.std,
            "classes": data.classes,
        }
        save_classifier(self.student, path, meta, {"gspn.distill_encoder.teacher": str(self.config.teacher)})

    def closing(self, summary: dict[str, Any]) -> str:
        return (
            f"student val acc {100 * self.record.get('val_acc', float('nan')):.2f}% "
            f"(best {100 * self.best_acc:.2f}%); outputs in {self.out}"
        )


def run(config: EncoderDistillationConfig, teacher: nn.Module | None = None) -> dict[str, Any]:
    """Distil as ``config`` says (:func:`gspn.training_utils.run` of :class:`EncoderDistillationRecipe`);
    return the run summary (also ``<output_dir>/summary.json``).

    Args:
        config: the run's settings.
        teacher: a teacher module following the protocol (module docstring) instead of
            ``config.teacher``'s file; the data setup then comes from ``config`` (digits defaults).

    Raises:
        ConfigError: a bad setting, a teacher without per-block outputs, a student whose token grid
            differs from the teacher's, a resume of another student or teacher.
        RunDirError: a run already in ``output_dir`` without ``resume``/``overwrite``.
        FloatingPointError: the loss or weights became non-finite (nothing bad is written).
    """
    return run_recipe(EncoderDistillationRecipe(config, teacher))
