r"""Cross-operator distillation of an attention encoder into an isotropic GSPN encoder.

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

The default teacher is a ``model.safetensors`` written by ``gspn train --model vit_nano`` (or a run
folder holding one): it loads with :func:`gspn.models.load_model`, and its recorded data setup
(image size, channels, mean/std) becomes the student's. The student is a registered classifier
(``gspn_vit_nano`` by default); its final weights are exported to ``<output_dir>/model.safetensors``,
loadable with :func:`gspn.models.load_model`.

Files and resume as ``gspn train``: ``last.pt`` after each epoch (the commit point: student,
adapters, the stage's optimizer and schedule, RNG states, the metrics record), then the
``metrics.jsonl`` line (with its ``stage``) and plot; ``resume="auto"`` continues bit-exactly;
``summary.json`` and the exported student at the end. Under ``torchrun`` each process trains on its
shard and DDP averages the gradients; rank 0 writes.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from .._files import check_output_dir, claim_run_dir
from .._validate import check_choice, check_int, check_number
from ..training_utils import (
    DistContext,
    Panel,
    all_gather_objects,
    all_reduce_sum,
    append_metrics,
    autocast_dtype,
    build_lr_scheduler,
    capture_rng,
    cleanup_distributed,
    derive_seed,
    evaluate,
    init_distributed,
    json_safe,
    load_state,
    param_groups,
    plot_metrics,
    read_metrics,
    restore_rank_rng,
    save_state,
    seed_all,
    sync_buffers,
    train_one_epoch,
    truncate_metrics,
    weights_digest,
)
from .data import build_data

__all__ = [
    "RUN_FILES",
    "EncoderDistillConfig",
    "block_outputs",
    "layer_map",
    "load_teacher",
    "nmse",
    "run",
    "validate",
]

CHECKPOINT_FORMAT = "gspn-distill-encoder-v1"
STAGE1_INPUTS = ("student", "teacher")
FEATURE_LOSSES = ("nmse", "mse")
RUN_FILES = ("last.pt", "metrics.jsonl", "metrics.png", "summary.json", "model.safetensors")
"""The files a ``gspn distill-encoder`` run writes in its folder (their presence marks it as a run's)."""

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
class EncoderDistillConfig:
    """Everything one ``gspn distill-encoder`` run depends on.

    Each field is the flag of the same name (``stage1_epochs`` ↔ ``--stage1-epochs``; ``gspn
    distill-encoder --help`` and ``docs/cli.md`` document them). ``teacher``: a ``model.safetensors``
    path or run folder (``None`` only when :func:`run` is given a teacher module); ``model`` /
    ``model_args``: the registered student and its constructor overrides; ``image_size`` /
    ``in_channels``: ``None`` takes the teacher's recorded setup (its normalisation mean/std always
    apply); ``epochs``: both stages together, ``stage1_epochs`` of them per-layer; ``resume``: ``None``, ``"auto"``
    (``<output_dir>/last.pt``) or a checkpoint path; ``precision``: ``auto``/``fp32``/``bf16``/``fp16``
    (mixed precision on CUDA only).
    """

    teacher: str | None = None
    model: str = "gspn_vit_nano"
    model_args: dict[str, Any] = field(default_factory=dict)
    data: str = "digits"
    output_dir: str = "runs/distill-encoder"
    image_size: int | None = None
    in_channels: int | None = None
    epochs: int = 10
    stage1_epochs: int = 3
    batch_size: int = 64
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    clip_grad: float | None = 1.0
    label_smoothing: float = 0.1
    stage1_inputs: str = "student"
    feature_loss: str = "nmse"
    feature_weight: float = 0.0
    output_weight: float = 1.0
    kd_weight: float = 1.0
    kd_temperature: float = 2.0
    label_weight: float = 1.0
    init_from_teacher: bool = True
    precision: str = "auto"
    workers: int = 2
    seed: int = 0
    device: str = "auto"
    dist_backend: str | None = None
    resume: str | None = None
    overwrite: bool = False
    stop_after_epochs: int | None = None
    train_limit: int | None = None
    val_limit: int | None = None
    progress: bool = True
    plot: bool = True
    verbose: bool = True


def validate(cfg: EncoderDistillConfig, teacher_given: bool = False) -> None:
    """Reject settings that cannot run, before any work: one ``ValueError`` naming the flag."""
    if not cfg.teacher and not teacher_given:
        raise ValueError("--teacher is required: a model.safetensors written by `gspn train` (or its run folder)")
    for name in ("epochs", "batch_size"):
        check_int(name, getattr(cfg, name))
    check_int("stage1_epochs", cfg.stage1_epochs, minimum=0)
    if cfg.stage1_epochs > cfg.epochs:
        raise ValueError(f"--stage1-epochs ({cfg.stage1_epochs}) must not exceed --epochs ({cfg.epochs})")
    for name in ("image_size", "in_channels", "train_limit", "val_limit", "stop_after_epochs"):
        check_int(name, getattr(cfg, name), allow_none=True)
    check_int("workers", cfg.workers, minimum=0)
    check_number("lr", cfg.lr, 0, lo_open=True)
    for name in (
        "min_lr",
        "weight_decay",
        "warmup_epochs",
        "feature_weight",
        "output_weight",
        "kd_weight",
        "label_weight",
    ):
        check_number(name, getattr(cfg, name), 0)
    check_number("kd_temperature", cfg.kd_temperature, 0, lo_open=True)
    check_number("label_smoothing", cfg.label_smoothing, 0, 1, hi_open=True)
    check_number("clip_grad", cfg.clip_grad, 0, allow_none=True)
    check_choice("stage1_inputs", cfg.stage1_inputs, STAGE1_INPUTS)
    check_choice("feature_loss", cfg.feature_loss, FEATURE_LOSSES)
    check_choice("precision", cfg.precision, ("auto", "fp32", "off", "bf16", "fp16"))
    if cfg.epochs > cfg.stage1_epochs and not (
        cfg.output_weight or cfg.kd_weight or cfg.label_weight or cfg.feature_weight
    ):
        raise ValueError(
            "stage 2 has no loss term: set --output-weight, --kd-weight, --label-weight or "
            "--feature-weight above 0 (or --stage1-epochs equal to --epochs)"
        )
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    check_output_dir(cfg.output_dir)


# ------------------------------------------------------------------------------------------ the protocol


def load_teacher(path: str) -> tuple[nn.Module, dict[str, Any]]:
    """The teacher of ``--teacher`` and the data setup it was trained with.

    Args:
        path: a ``.safetensors`` file written by :func:`gspn.models.save_checkpoint` (``gspn train``'s
            ``model.safetensors``), or a folder holding ``model.safetensors``.

    Returns:
        ``(model, data)``: the model in eval mode with frozen parameters, and the ``gspn.train.*``
        metadata it carries (``img_size``, ``in_chans``, ``mean``, ``std``, ``num_classes``,
        ``classes``, ``model_name``; empty when the file has none).

    Raises:
        ValueError / FileNotFoundError: no such file, or a file without the architecture metadata.
    """
    from ..models import load_model, read_metadata

    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.is_file():
        raise FileNotFoundError(f"--teacher: no checkpoint at {p} (give a model.safetensors from `gspn train`)")
    try:
        meta = read_metadata(p)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"--teacher: {p} is not a safetensors checkpoint ({exc})") from None
    if "gspn.architecture" not in meta:
        raise ValueError(
            f"--teacher: {p} has no 'gspn.architecture' metadata (write it with gspn.models."
            "save_checkpoint, as `gspn train` does)"
        )
    model = load_model(p)
    data = {k.removeprefix("gspn.train."): json.loads(v) for k, v in meta.items() if k.startswith("gspn.train.")}
    return model.eval().requires_grad_(False), data


def _tokens(t: torch.Tensor, who: str) -> torch.Tensor:
    """``(B, C, h, w)`` → ``(B, h·w, C)``; ``(B, N, C)`` unchanged."""
    if t.dim() == 4:
        return t.flatten(2).transpose(1, 2)
    if t.dim() == 3:
        return t
    raise ValueError(f"{who}: block outputs must be (B, C, h, w) or (B, N, C) tensors, got {tuple(t.shape)}")


def block_outputs(model: nn.Module, x: torch.Tensor, who: str = "--teacher") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(final, [block outputs])`` of ``model`` on ``x``, each as tokens ``(B, N, C)``.

    Raises:
        ValueError: ``model`` has no ``forward_intermediates`` (the per-block protocol of the module
            docstring), or returns something else than ``(tensor, [tensors])``.
    """
    fn = getattr(model, "forward_intermediates", None)
    if not callable(fn):
        raise ValueError(
            f"{who}: {type(model).__name__} has no per-block outputs: it needs forward_intermediates(x) -> "
            "(final, [block outputs]) as timm's and gspn's ViTs have (see docs/distillation.md)"
        )
    out = fn(x)
    if not (
        isinstance(out, tuple)
        and len(out) == 2
        and torch.is_tensor(out[0])
        and isinstance(out[1], (list, tuple))
        and len(out[1]) > 0
        and all(torch.is_tensor(t) for t in out[1])
    ):
        raise ValueError(f"{who}: forward_intermediates(x) must return (final tensor, [one tensor per block])")
    return _tokens(out[0], who), [_tokens(t, who) for t in out[1]]


def layer_map(student_depth: int, teacher_depth: int) -> list[int]:
    """The teacher block each student block is supervised with: ``round((i + 1)·Dt / Ds) − 1``.

    >>> layer_map(4, 4), layer_map(2, 4), layer_map(4, 2)
    ([0, 1, 2, 3], [1, 3], [0, 0, 1, 1])
    """
    return [max(0, math.floor((i + 1) * teacher_depth / student_depth + 0.5) - 1) for i in range(student_depth)]


def nmse(s: torch.Tensor, t: torch.Tensor, normalise: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """``mean((s − t)²) / mean(t²)`` (``normalise=False``: the plain MSE); float32 scalar.

    The normaliser is the target's mean square over the whole batch (detached): ``1`` is the error
    of predicting zeros, whatever the scale of the layer's activations.
    """
    s, t = s.float(), t.float()
    err = F.mse_loss(s, t)
    return err / (t.detach().pow(2).mean() + eps) if normalise else err


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))``, averaged over the batch (Hinton et al. 2015)."""
    t = temperature
    return (
        F.kl_div(
            F.log_softmax(student_logits.float() / t, -1),
            F.log_softmax(teacher_logits.float() / t, -1),
            reduction="batchmean",
            log_target=True,
        )
        * t
        * t
    )


# ------------------------------------------------------------------------------------------ the step


class _Distiller(nn.Module):
    """Student + adapters (the trainable part; the teacher is held outside the module tree).

    ``forward(x)`` runs the teacher (no grad) and the student, keeps the feature terms of the
    current stage, and returns the student's logits; :meth:`criterion` adds the logit terms. This lets
    :func:`gspn.training_utils.train_one_epoch` (and DDP) run a distillation step unchanged.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        cfg: EncoderDistillConfig,
        mapping: list[int],
        s_widths: list[int],
        t_widths: list[int],
        s_final: int,
        t_final: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.student = student
        self._teacher = (teacher,)  # not a submodule: frozen, not in state dicts or DDP
        self.cfg = cfg
        self.mapping = mapping
        self.num_classes = num_classes

        def adapter(cs: int, ct: int) -> nn.Module:
            return nn.Linear(cs, ct) if cs != ct else nn.Identity()

        self.adapters = nn.ModuleList(adapter(s_widths[i], t_widths[j]) for i, j in enumerate(mapping))
        self.final_adapter = adapter(s_final, t_final)
        self.stage = 1
        self.reset_sums()

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def reset_sums(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self._parts: dict[str, torch.Tensor] = {}
        self._teacher_logits: torch.Tensor | None = None

    def set_stage(self, stage: int) -> None:
        """Freeze what the stage's loss does not reach (DDP needs every trainable parameter used)."""
        cfg = self.cfg
        self.stage = stage
        layers = stage == 1 or cfg.feature_weight > 0
        logits = stage == 2 and (cfg.kd_weight > 0 or cfg.label_weight > 0)
        self.student.requires_grad_(True)
        self.adapters.requires_grad_(layers)
        self.final_adapter.requires_grad_(stage == 2 and cfg.output_weight > 0)
        head = getattr(self.student, "head", None)
        if head is not None:
            head.requires_grad_(logits)

    def _layer_loss(self, s_blocks: list[torch.Tensor], t_blocks: list[torch.Tensor]) -> torch.Tensor:
        norm = self.cfg.feature_loss == "nmse"
        terms = [nmse(a(s), t_blocks[j], norm) for a, s, j in zip(self.adapters, s_blocks, self.mapping, strict=True)]
        return torch.stack(terms).mean()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg, stage = self.cfg, self.stage
        teacher = self.teacher
        need_t_logits = stage == 2 and cfg.kd_weight > 0
        with torch.no_grad():
            t_out = teacher.forward_intermediates(x)
            t_final_map, t_maps = t_out
            t_final, t_blocks = _tokens(t_final_map, "--teacher"), [_tokens(t, "--teacher") for t in t_maps]
            self._teacher_logits = teacher.forward_head(t_final_map) if need_t_logits else None
        parts: dict[str, torch.Tensor] = {}
        if stage == 1 and cfg.stage1_inputs == "teacher":
            student = self.student
            h = student.patch_embed(x).permute(0, 2, 3, 1)  # (B, h, w, D)
            outs = []
            for i, block in enumerate(student.blocks):
                inp = h if i == 0 else t_blocks[i - 1].reshape(h.shape)  # the teacher's tokens on the grid
                outs.append(_tokens(block(inp).permute(0, 3, 1, 2), "--model"))
            parts["layer"] = self._layer_loss(outs, t_blocks)
            self._parts = parts
            return torch.zeros(x.shape[0], self.num_classes, device=x.device)
        s_final_map, s_maps = self.student.forward_intermediates(x)
        s_final, s_blocks = _tokens(s_final_map, "--model"), [_tokens(t, "--model") for t in s_maps]
        if stage == 1 or cfg.feature_weight > 0:
            parts["layer"] = self._layer_loss(s_blocks, t_blocks)
        if stage == 2 and cfg.output_weight > 0:
            parts["output"] = nmse(self.final_adapter(s_final), t_final, cfg.feature_loss == "nmse")
        self._parts = parts
        if stage == 1:
            with torch.no_grad():
                return self.student.forward_head(s_final_map)
        return self.student.forward_head(s_final_map)

    def criterion(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The stage's loss from the terms :meth:`forward` kept and the logits; accumulates the parts."""
        cfg, parts = self.cfg, dict(self._parts)
        if self.stage == 2:
            if cfg.kd_weight > 0:
                parts["kd"] = kd_loss(logits, self._teacher_logits, cfg.kd_temperature)
            if cfg.label_weight > 0:
                parts["label"] = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        weights = (
            {"layer": 1.0}
            if self.stage == 1
            else {
                "layer": cfg.feature_weight,
                "output": cfg.output_weight,
                "kd": cfg.kd_weight,
                "label": cfg.label_weight,
            }
        )
        loss = sum(weights[k] * v for k, v in parts.items())
        bs = y.numel()
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, torch.zeros((), dtype=torch.float64, device=v.device)) + v.detach() * bs
        self._parts, self._teacher_logits = {}, None
        return loss


# ------------------------------------------------------------------------------------------ the run


def run(config: EncoderDistillConfig, teacher: nn.Module | None = None) -> dict[str, Any]:
    """The encoder-distillation recipe (``gspn distill-encoder``); returns the run summary.

    Args:
        config: the run's settings.
        teacher: a teacher module following the protocol (module docstring) instead of
            ``config.teacher``'s file; the data setup then comes from ``config`` (digits defaults).

    Raises:
        ValueError: a bad setting (naming its flag), a teacher without per-block outputs, a
            student whose token grid differs from the teacher's, a run already in ``output_dir``
            without ``resume``/``overwrite``.
        FloatingPointError: the loss or weights became non-finite (nothing bad is written).
    """
    validate(config, teacher_given=teacher is not None)
    ctx = init_distributed(config.device, config.dist_backend)
    ok = False
    run_dir = None
    try:
        job = _Run(config, ctx, teacher)  # loads the teacher: a bad --teacher fails before the folder is made
        if ctx.is_main:
            run_dir = claim_run_dir(
                config.output_dir, RUN_FILES, resume=bool(config.resume), overwrite=config.overwrite
            )
        summary = job.train()
        ok = True
        return summary
    finally:
        if run_dir is not None:
            run_dir.release()
        cleanup_distributed(ok)


def _shard(ds: Dataset, ctx: DistContext) -> Dataset:
    if not ctx.distributed:
        return ds
    return Subset(ds, list(range(ctx.rank, len(ds), ctx.world_size)))  # type: ignore[arg-type]


class _Run:
    """One distillation run: set-up, stages, checkpoints (see the module docstring)."""

    def __init__(self, cfg: EncoderDistillConfig, ctx: DistContext, teacher: nn.Module | None) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.out = Path(cfg.output_dir)
        self.teacher_meta: dict[str, Any] = {}
        if teacher is None:
            assert cfg.teacher is not None
            teacher, self.teacher_meta = load_teacher(cfg.teacher)
        else:
            teacher.eval().requires_grad_(False)
        self.teacher = teacher.to(ctx.device)
        self.teacher_digest = weights_digest(teacher)

    def _log(self, msg: str) -> None:
        if self.ctx.is_main and self.cfg.verbose:
            print(msg, flush=True)

    # -------------------------------------------------------------- set-up

    def _setup(self) -> None:
        cfg, ctx, tm = self.cfg, self.ctx, self.teacher_meta
        dev = ctx.device
        mean, std = tm.get("mean"), tm.get("std")
        in_chans = cfg.in_channels or tm.get("in_chans") or 3
        if cfg.in_channels and tm.get("in_chans") and cfg.in_channels != tm["in_chans"]:
            raise ValueError(f"--in-channels {cfg.in_channels}: the teacher was trained on {tm['in_chans']} channels")
        self.data = build_data(
            cfg.data,
            img_size=cfg.image_size or tm.get("img_size"),
            in_chans=in_chans,
            mean=mean if mean and len(mean) == in_chans else None,
            std=std if std and len(std) == in_chans else None,
            train_limit=cfg.train_limit,
            val_limit=cfg.val_limit,
        )
        data = self.data
        from ..models import create_model, get_default_cfg

        task = get_default_cfg(cfg.model).get("task", "classification")
        if task != "classification":
            raise ValueError(f"--model {cfg.model} is a {task} model; the student must be an encoder/classifier")
        seed_all(cfg.seed)
        student = create_model(cfg.model, num_classes=data.num_classes, in_chans=data.in_chans, **cfg.model_args)
        self.student = student.to(dev)
        self.model_args = dict(getattr(student, "model_args", {}) or cfg.model_args)
        self._check_pair()
        if cfg.init_from_teacher:
            self.copied = self._init_from_teacher()
        self.module = _Distiller(
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
        rank_seed = derive_seed(cfg.seed, rank=ctx.rank)
        seed_all(rank_seed)
        self.gen = torch.Generator().manual_seed(rank_seed)
        self.sampler = (
            DistributedSampler(data.train, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.seed)
            if ctx.distributed
            else None
        )
        pin = dev.type == "cuda"
        self.train_loader = DataLoader(
            data.train,
            batch_size=cfg.batch_size,
            num_workers=cfg.workers,
            pin_memory=pin,
            shuffle=self.sampler is None,
            sampler=self.sampler,
            generator=self.gen,
        )
        self.val_loader = DataLoader(
            _shard(data.val, ctx),
            batch_size=cfg.batch_size,
            num_workers=cfg.workers,
            pin_memory=pin,
            generator=torch.Generator().manual_seed(0),
        )
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise ValueError("the training set is empty")
        self.amp_dtype = autocast_dtype("off" if cfg.precision == "fp32" else cfg.precision, dev)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    def _check_pair(self) -> None:
        """Probe both models on one validation image: protocol, token grids, widths, layer map."""
        cfg = self.cfg
        x = self.data.val[0][0][None].to(self.ctx.device)
        self.student.eval()
        with torch.no_grad():
            t_final, t_blocks = block_outputs(self.teacher, x, "--teacher")
            s_final, s_blocks = block_outputs(self.student, x, "--model")
        self.student.train()
        self.teacher_logits = False
        if callable(getattr(self.teacher, "forward_head", None)):
            with torch.no_grad():
                z = self.teacher.forward_head(self.teacher.forward_intermediates(x)[0])
            self.teacher_logits = torch.is_tensor(z) and tuple(z.shape) == (1, self.data.num_classes)
        if cfg.kd_weight > 0 and cfg.epochs > cfg.stage1_epochs and not self.teacher_logits:
            raise ValueError(
                f"--kd-weight: the teacher gives no logits over the data's {self.data.num_classes} "
                "classes (forward_head(final) -> (B, classes)); set --kd-weight 0"
            )
        if t_final.shape[1] != s_final.shape[1] or any(t.shape[1] != t_final.shape[1] for t in t_blocks):
            raise ValueError(
                f"--model: the student's token grid ({s_final.shape[1]} tokens) differs from the teacher's "
                f"({t_final.shape[1]}); use the same patch size (e.g. vit_nano → gspn_vit_nano)"
            )
        self.mapping = layer_map(len(s_blocks), len(t_blocks))
        self.s_widths = [t.shape[-1] for t in s_blocks]
        self.t_widths = [t.shape[-1] for t in t_blocks]
        self.s_final, self.t_final = s_final.shape[-1], t_final.shape[-1]
        if cfg.stage1_inputs == "teacher" and cfg.stage1_epochs > 0:
            from ..models import GSPNViT

            if not isinstance(self.student, GSPNViT):
                raise ValueError(
                    "--stage1-inputs teacher needs a gspn_vit_* student (blocks run on the teacher's "
                    "block outputs); use --stage1-inputs student"
                )
            if len(s_blocks) != len(t_blocks) or self.s_widths != self.t_widths:
                raise ValueError(
                    "--stage1-inputs teacher needs a student of the teacher's depth and width "
                    f"(student {len(s_blocks)}×{self.s_widths[0]}, teacher {len(t_blocks)}×"
                    f"{self.t_widths[0]}); use --stage1-inputs student"
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
        return 1 if epoch < self.cfg.stage1_epochs else 2

    def _stage_epochs(self, stage: int) -> int:
        return self.cfg.stage1_epochs if stage == 1 else self.cfg.epochs - self.cfg.stage1_epochs

    def _build_stage(self, stage: int) -> None:
        """The stage's trainable set, DDP wrapper, AdamW and warm-up/cosine schedule."""
        cfg, ctx, spe = self.cfg, self.ctx, self.steps_per_epoch
        self.module.set_stage(stage)
        self.ddp: nn.Module = self.module
        if ctx.distributed:
            dev = ctx.device
            self.ddp = nn.parallel.DistributedDataParallel(
                self.module, device_ids=[dev.index] if dev.type == "cuda" else None
            )
        self.optimizer = torch.optim.AdamW(param_groups(self.module, cfg.weight_decay), lr=cfg.lr)
        total = self._stage_epochs(stage) * spe
        self.scheduler = build_lr_scheduler(
            self.optimizer,
            "cosine",
            total_steps=total,
            warmup_steps=min(round(cfg.warmup_epochs * spe), total),
            min_lr_ratio=cfg.min_lr / cfg.lr,
        )
        self.stage = stage

    # -------------------------------------------------------------- resume

    def _load_resume(self) -> dict[str, Any] | None:
        cfg, ctx = self.cfg, self.ctx
        path: Path | None = None
        if cfg.resume == "auto":
            p = self.out / "last.pt"
            path = p if p.exists() else None
        elif cfg.resume:
            path = Path(cfg.resume)
            if not path.exists():
                raise FileNotFoundError(f"--resume: no checkpoint at {path}")
        seen = all_gather_objects(str(path) if path else None, ctx)
        if len(set(seen)) > 1:
            raise RuntimeError(f"--resume: the ranks disagree on the checkpoint to resume from ({seen})")
        if path is None:
            return None
        ckpt = load_state(path)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"--resume: {path} is not a gspn distill-encoder checkpoint")
        if ckpt["model_name"] != cfg.model or ckpt["model_args_requested"] != cfg.model_args:
            raise ValueError(
                f"--resume: the checkpoint is for student {ckpt['model_name']} "
                f"{ckpt['model_args_requested']}, not {cfg.model} {cfg.model_args}"
            )
        if ckpt["teacher_digest"] != self.teacher_digest:
            raise ValueError("--resume: the checkpoint was distilled from another teacher (weights differ)")
        for key in ("epochs", "stage1_epochs"):
            if ckpt["config"][key] != getattr(cfg, key):
                raise ValueError(
                    f"--resume: the run has --{key.replace('_', '-')} {ckpt['config'][key]}, not {getattr(cfg, key)}"
                )
        ckpt["path"] = path
        return ckpt

    def _repair_after_kill(self, ckpt: dict[str, Any]) -> None:
        """Bring ``metrics.jsonl`` in line with the ``last.pt`` resumed (as ``gspn train`` does)."""
        metrics = self.out / "metrics.jsonl"
        truncate_metrics(metrics, ckpt["epoch"])
        record = ckpt.get("record")
        if record is not None and not any(r.get("epoch") == ckpt["epoch"] for r in read_metrics(metrics)):
            append_metrics(metrics, record)

    # -------------------------------------------------------------- loop

    def train(self) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        if ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        ckpt = self._load_resume()
        self._setup()
        data, dev = self.data, ctx.device
        start, step, elapsed, best_acc, best_epoch = 0, 0, 0.0, -1.0, -1
        if ckpt is not None:
            self.module.load_state_dict(ckpt["distiller"])
            start, step = ckpt["epoch"] + 1, ckpt["step"]
            elapsed, best_acc, best_epoch = ckpt["elapsed_s"], ckpt["best_acc"], ckpt["best_epoch"]
            restore_rank_rng(ckpt["rng"], ctx.rank, ctx.world_size, self.gen)
            if start < cfg.epochs and self._stage_of(start) == ckpt["stage"]:
                self._build_stage(ckpt["stage"])
                self.optimizer.load_state_dict(ckpt["optimizer"])
                self.scheduler.load_state_dict(ckpt["scheduler"])
                self.scaler.load_state_dict(ckpt["scaler"])
            stage_now = self._stage_of(min(start, cfg.epochs - 1))
            self._log(f"resumed from {ckpt['path']} at epoch {start} (stage {stage_now})")
            if ctx.is_main:
                self._repair_after_kill(ckpt)
            del ckpt
        teacher_val = evaluate(self.teacher, self.val_loader, dev, ctx, self.amp_dtype) if self.teacher_logits else None
        n_params = sum(p.numel() for p in self.student.parameters())
        self._log(
            f"student {cfg.model}: {n_params / 1e6:.3f}M params, {self.depths[0]} blocks ← teacher "
            f"{type(self.teacher).__name__} ({self.depths[1]} blocks"
            + (f", val acc {100 * teacher_val['acc']:.2f}%" if teacher_val else "")
            + f") | data {data.source}: "
            f"{len(data.train)} train / {len(data.val)} val, {data.img_size}px | stage 1: {cfg.stage1_epochs} epochs "
            f"({cfg.stage1_inputs} inputs), stage 2: {cfg.epochs - cfg.stage1_epochs} epochs × "
            f"{self.steps_per_epoch} steps"
        )

        from tqdm.auto import tqdm

        end = cfg.epochs if cfg.stop_after_epochs is None else min(cfg.epochs, start + cfg.stop_after_epochs)
        last: dict[str, Any] = {}
        for epoch in range(start, end):
            stage = self._stage_of(epoch)
            if getattr(self, "stage", None) != stage:
                self._build_stage(stage)
            t0 = time.perf_counter()
            if self.sampler is not None:
                self.sampler.set_epoch(epoch)
            bar = tqdm(
                self.train_loader,
                desc=f"stage {stage} epoch {epoch + 1}/{cfg.epochs}",
                disable=not (cfg.progress and ctx.is_main),
                leave=False,
                dynamic_ncols=True,
                file=sys.stderr,
            )
            self.module.reset_sums()
            stats = train_one_epoch(
                self.ddp,
                bar,
                self.optimizer,
                self.module.criterion,
                dev,
                params_of=self.module,
                scheduler=self.scheduler,
                scaler=self.scaler,
                clip_grad=cfg.clip_grad,
                amp_dtype=self.amp_dtype,
                step=step,
            )
            bar.close()
            step = stats.step
            names = sorted(self.module.sums)
            reduced = all_reduce_sum(
                [stats.loss_sum.item(), float(stats.correct.item()), stats.seen]
                + [self.module.sums[k].item() for k in names],
                ctx,
            )
            loss_sum, correct, seen = reduced[:3]
            parts = dict(zip(names, reduced[3:], strict=True))
            if not math.isfinite(loss_sum) or not all(bool(torch.isfinite(p).all()) for p in self.module.parameters()):
                raise FloatingPointError(
                    f"non-finite weights or loss after epoch {epoch + 1} (step {step}; mean loss {loss_sum / seen}); "
                    f"stopped before writing: {self.out} keeps the last good state (lower --lr or set --clip-grad)"
                )
            train_time = time.perf_counter() - t0
            sync_buffers(self.module, ctx)
            val = evaluate(self.student, self.val_loader, dev, ctx, self.amp_dtype)
            elapsed += time.perf_counter() - t0
            if val["acc"] > best_acc:
                best_acc, best_epoch = val["acc"], epoch
            record = {
                "epoch": epoch,
                "stage": stage,
                "step": step,
                "lr": self.scheduler.get_last_lr()[0],
                "train_loss": loss_sum / seen,
                **{f"train_{k}_loss": v / seen for k, v in parts.items()},
                **({"train_acc": correct / seen} if stage == 2 or cfg.stage1_inputs == "student" else {}),
                "val_loss": val["loss"],
                "val_acc": val["acc"],
                "best_acc": best_acc,
                "epoch_s": time.perf_counter() - t0,
                "train_imgs_per_s": seen / train_time,
                "elapsed_s": elapsed,
            }
            last = record
            rng_all = all_gather_objects(capture_rng(self.gen), ctx)
            if ctx.is_main:
                state = {
                    "format": CHECKPOINT_FORMAT,
                    "model_name": cfg.model,
                    "model_args_requested": cfg.model_args,
                    "model_args": self.model_args,
                    "teacher_digest": self.teacher_digest,
                    "config": json_safe(asdict(cfg)),
                    "distiller": self.module.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "stage": stage,
                    "epoch": epoch,
                    "step": step,
                    "best_acc": best_acc,
                    "best_epoch": best_epoch,
                    "elapsed_s": elapsed,
                    "world_size": ctx.world_size,
                    "rng": rng_all,
                    "record": record,
                }
                save_state(self.out / "last.pt", state)
                append_metrics(self.out / "metrics.jsonl", record)
                if cfg.plot:
                    plot_metrics(self.out / "metrics.jsonl", self.out / "metrics.png", _PANELS)
                loss_txt = " ".join(f"{k} {v / seen:.4f}" for k, v in parts.items())
                self._log(
                    f"stage {stage} epoch {epoch + 1}/{cfg.epochs} | {loss_txt} | val {val['loss']:.4f} / "
                    f"{100 * val['acc']:.2f}% | {record['epoch_s']:.1f}s"
                )
            if ctx.distributed:
                dist.barrier()
        return self._finish(end, step, elapsed, best_acc, best_epoch, last, teacher_val, n_params)

    def _finish(
        self,
        end: int,
        step: int,
        elapsed: float,
        best_acc: float,
        best_epoch: int,
        last: dict[str, Any],
        teacher_val: dict[str, Any] | None,
        n_params: int,
    ) -> dict[str, Any]:
        cfg, ctx, data = self.cfg, self.ctx, self.data
        digests = all_gather_objects(weights_digest(self.student), ctx)
        summary = {
            "model": cfg.model,
            "model_args": self.model_args,
            "params": n_params,
            "teacher": cfg.teacher,
            "teacher_val_acc": teacher_val["acc"] if teacher_val else None,
            "epochs": cfg.epochs,
            "stage1_epochs": cfg.stage1_epochs,
            "epochs_done": end,
            "steps": step,
            "world_size": ctx.world_size,
            "best_acc": best_acc,
            "best_epoch": best_epoch,
            "final": last,
            "elapsed_s": elapsed,
            "rank_weight_digests": digests,
            "output": str(self.out),
        }
        if ctx.is_main:
            if len(set(digests)) > 1:
                warnings.warn("DDP ranks ended with different weights: " + ", ".join(digests), stacklevel=2)
            if end == cfg.epochs:
                self._export(data)
                summary["weights"] = str(self.out / "model.safetensors")
            text = json.dumps(json_safe(summary), indent=2).encode()
            from .._files import atomic_write

            atomic_write(self.out / "summary.json", lambda f: f.write(text))
            self._log(
                f"student val acc {100 * last.get('val_acc', float('nan')):.2f}% "
                f"(best {100 * best_acc:.2f}%); outputs in {self.out}"
            )
        return summary

    def _export(self, data: Any) -> None:
        """The student in the library's weight format, with the data setup as ``gspn.train.*`` metadata
        (the keys ``gspn train`` writes, so a distilled student can itself be a teacher)."""
        from ..models import save_checkpoint

        meta = {
            "model_name": self.cfg.model,
            "model_args": self.model_args,
            "num_classes": data.num_classes,
            "in_chans": data.in_chans,
            "img_size": data.img_size,
            "mean": data.mean,
            "std": data.std,
            "classes": data.classes,
        }
        md = {f"gspn.train.{k}": json.dumps(json_safe(v)) for k, v in meta.items()}
        md["gspn.distill_encoder.teacher"] = str(self.cfg.teacher)
        save_checkpoint(self.student, self.out / "model.safetensors", metadata=md)
