"""What the epoch-based recipes share (classification, encoder distillation): :class:`EpochRecipe`, its data
loaders and the classifier weight export.

An :class:`EpochRecipe` is a :class:`~.runner.Recipe` whose unit is one epoch of mini-batch training over a
``DataLoader``: one training and one evaluation loader with per-rank seeding (a
:class:`~torch.utils.data.distributed.DistributedSampler` under ``torchrun``, the evaluation set sharded
without padding), one :func:`~.loop.train_one_epoch` per unit, and ``stop_after_epochs`` to end an
invocation early without shortening the schedule.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from .._validate import check_choice, check_int, check_number
from .config import PRECISIONS, ConfigError, RunConfig
from .distributed import DistContext, all_gather_objects
from .loop import EpochStats, train_one_epoch, weights_digest
from .metrics import json_safe
from .runner import Progress, Recipe
from .seeding import derive_seed, seed_all

__all__ = [
    "CLASSIFIER_METADATA",
    "EpochRecipe",
    "EpochRunConfig",
    "check_epoch_config",
    "data_loader",
    "eval_shard",
    "save_classifier",
]

_REFRESH_EVERY = 10  # progress-bar loss refresh interval, in optimizer steps

#: The data setup a classifier's weight file carries as ``gspn.train.<key>`` metadata (JSON values): what
#: ``gspn eval``, ``gspn distill-encoder --teacher`` and :func:`gspn.models.load_model` users read back.
CLASSIFIER_METADATA: tuple[str, ...] = (
    "model_name",
    "model_args",
    "num_classes",
    "in_chans",
    "img_size",
    "mean",
    "std",
    "classes",
)


def eval_shard(ds: Dataset, ctx: DistContext) -> Dataset:
    """This rank's slice of an evaluation set: every sample on exactly one rank, no padding."""
    if not ctx.distributed:
        return ds
    return Subset(ds, list(range(ctx.rank, len(ds), ctx.world_size)))  # type: ignore[arg-type]


def data_loader(ds: Dataset, batch_size: int, workers: int, device: torch.device, **kw: Any) -> DataLoader:
    """A ``DataLoader`` of ``batch_size`` with ``workers`` processes, pinned memory on CUDA; ``kw`` as
    ``DataLoader`` takes them."""
    return DataLoader(ds, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda", **kw)


def save_classifier(
    model: nn.Module, path: Path, meta: dict[str, Any], extra: dict[str, str] | None = None, *, strict: bool = True
) -> None:
    """``model`` in the library's one weight format (:func:`gspn.models.save_checkpoint`), with the
    :data:`CLASSIFIER_METADATA` entries of ``meta`` as ``gspn.train.*`` metadata, plus ``extra``.

    ``strict=False`` turns a failed write (``RuntimeError``: e.g. tensors sharing storage) into a warning:
    the weights are still in the training state.
    """
    from ..models import save_checkpoint

    metadata = {f"gspn.train.{k}": json.dumps(json_safe(meta[k])) for k in CLASSIFIER_METADATA}
    metadata.update(extra or {})
    try:
        save_checkpoint(model, path, metadata=metadata)
    except RuntimeError as e:
        if strict:
            raise
        warnings.warn(f"safetensors export skipped: {e}", stacklevel=2)


@dataclass
class EpochRunConfig(RunConfig):
    """The fields of every epoch-based recipe (each is the flag of its name): the model and its
    ``--model-arg`` overrides, the data (``digits`` or an ImageFolder root), the AdamW + warm-up/cosine
    optimisation, mixed precision, DDP and the per-invocation limit ``stop_after_epochs``."""

    model: str = ""
    model_args: dict[str, Any] = field(default_factory=dict)
    data: str = "digits"
    image_size: int | None = None
    in_channels: int | None = 3
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    clip_grad: float | None = 1.0
    precision: str = "auto"
    workers: int = 2
    dist_backend: str | None = None
    stop_after_epochs: int | None = None
    train_limit: int | None = None
    val_limit: int | None = None
    plot: bool = True


def check_epoch_config(cfg: EpochRunConfig) -> None:
    """Reject shared settings that cannot train, before any work.

    Raises:
        ConfigError: naming the first bad field.
    """
    for name in ("epochs", "batch_size"):
        check_int(name, getattr(cfg, name))
    for name in ("image_size", "in_channels", "train_limit", "val_limit", "stop_after_epochs"):
        check_int(name, getattr(cfg, name), allow_none=True)
    check_int("workers", cfg.workers, minimum=0)
    for name in ("lr", "min_lr", "weight_decay", "warmup_epochs"):
        check_number(name, getattr(cfg, name), 0)
    if cfg.min_lr > cfg.lr:  # the "cosine decay" would climb to min_lr
        raise ConfigError("min_lr", f"({cfg.min_lr:g}) must not exceed `lr` ({cfg.lr:g})")
    check_number("label_smoothing", cfg.label_smoothing, 0, 1, hi_open=True)
    check_number("clip_grad", cfg.clip_grad, 0, allow_none=True)
    check_choice("precision", cfg.precision, PRECISIONS)


class EpochRecipe(Recipe):
    """A recipe whose unit is one epoch of mini-batch training over a ``DataLoader``.

    The subclass's config is an :class:`EpochRunConfig`; its :meth:`build` calls :meth:`build_loaders` and
    sets ``optimizer``, ``scheduler``, ``scaler`` and ``amp_dtype``; its :meth:`run_unit` calls
    :meth:`train_epoch`.
    """

    unit: ClassVar[str] = "epoch"
    loss_key: ClassVar[str] = "train_loss"
    free_fields: ClassVar[frozenset[str]] = frozenset({"stop_after_epochs", "dist_backend"})
    run_files: ClassVar[tuple[str, ...]] = (
        "last.pt",
        "metrics.jsonl",
        "metrics.png",
        "summary.json",
        "model.safetensors",
    )

    config: EpochRunConfig
    step: int = 0
    gen: torch.Generator
    sampler: DistributedSampler | None
    train_loader: DataLoader
    val_loader: DataLoader
    steps: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None

    def build_loaders(self, train: Dataset, val: Dataset) -> None:
        """The loaders of ``train`` (shuffled, per-rank seeded generator :attr:`gen`) and of this rank's
        shard of ``val``; :attr:`steps` per epoch.

        Raises:
            ConfigError: the training set is empty.
        """
        cfg, ctx, dev = self.config, self.ctx, self.ctx.device
        # Per-rank data RNG: a different augmentation stream on each rank, reproducible per rank.
        rank_seed = derive_seed(cfg.seed, rank=ctx.rank)
        seed_all(rank_seed)
        self.gen = torch.Generator().manual_seed(rank_seed)
        self.sampler = (
            DistributedSampler(train, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.seed)
            if ctx.distributed
            else None
        )
        batch, workers = cfg.batch_size, cfg.workers
        self.train_loader = data_loader(
            train, batch, workers, dev, shuffle=self.sampler is None, sampler=self.sampler, generator=self.gen
        )
        self.val_loader = data_loader(
            eval_shard(val, ctx), batch, workers, dev, generator=torch.Generator().manual_seed(0)
        )
        self.steps = len(self.train_loader)
        if self.steps == 0:
            raise ConfigError("data", "holds no training images")

    def train_epoch(
        self,
        index: int,
        progress: Progress,
        model: nn.Module,
        criterion: Any,
        params_of: nn.Module,
        ema: torch.optim.swa_utils.AveragedModel | None = None,
    ) -> EpochStats:
        """Epoch ``index`` of :func:`~.loop.train_one_epoch` over :attr:`train_loader` (``model`` runs
        forward, ``params_of`` is clipped and averaged into ``ema``), ticking ``progress``."""
        if self.sampler is not None:
            self.sampler.set_epoch(index)
        # The loop before the runner wrapped the loader in tqdm.auto, whose asyncio bar opens one extra
        # iterator and so draws one more DataLoader base seed per epoch; the same draw keeps the numbers
        # of those runs, and their resumes, bit-identical.
        torch.empty((), dtype=torch.int64).random_(generator=self.gen)

        def on_step(step: int, loss: torch.Tensor) -> None:
            if step % _REFRESH_EVERY == 0:
                progress.update(1, loss=loss.item(), lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            else:
                progress.update(1)

        stats = train_one_epoch(
            model,
            self.train_loader,
            self.optimizer,
            criterion,
            self.ctx.device,
            params_of=params_of,
            scheduler=self.scheduler,
            scaler=self.scaler,
            clip_grad=self.config.clip_grad,
            ema=ema,
            amp_dtype=self.amp_dtype,
            step=self.step,
            on_step=on_step,
        )
        self.step = stats.step
        return stats

    def rank_digests(self, model: nn.Module) -> list[str]:
        """Every rank's :func:`~.loop.weights_digest` of ``model`` (rank 0 warns when DDP ranks differ)."""
        digests = all_gather_objects(weights_digest(model), self.ctx)
        if self.ctx.is_main and len(set(digests)) > 1:
            warnings.warn("DDP ranks ended with different weights: " + ", ".join(digests), stacklevel=2)
        return digests

    def num_units(self) -> int:
        return self.config.epochs

    def steps_per_unit(self) -> int:
        return self.steps

    def rng_generator(self) -> torch.Generator:
        return self.gen

    def nonfinite_cause(self) -> str:
        return "the training diverged (lower `lr`, or `clip_grad`)"

    def stop_early(self, index: int, first: int) -> str | None:
        n = self.config.stop_after_epochs
        if n is not None and index + 1 - first >= n and index + 1 < self.num_units():
            return f"stop_after_epochs ({n}) reached"
        return None
