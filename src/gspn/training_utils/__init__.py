"""The training kit every recipe (:mod:`gspn.recipes`) builds on.

It imports nothing above :mod:`gspn.integrations` (and no recipe):

* :mod:`.state` — one training-state format (:func:`training_state`: the same key names in every
  recipe, an atomic, weights-only ``torch.save`` dict; :func:`load_state` reads the older key names too)
  and one RNG capture/restore (:func:`capture_rng`, :func:`restore_rng`, :func:`restore_rank_rng`) for
  exact resume;
* :mod:`.seeding` — one seeding rule (:func:`derive_seed` of ``(seed, step, rank)``, :func:`seed_all`);
* :mod:`.ema` — one EMA (:func:`build_ema`, a ``torch.optim.swa_utils.AveragedModel``);
* :mod:`.schedule` — one LR-schedule helper (:func:`build_lr_scheduler`, a ``LambdaLR``: warm-up, then
  constant or cosine);
* :mod:`.distributed` — ``torchrun`` set-up/tear-down and reductions;
* :mod:`.metrics` — the JSON-lines log and its plot;
* :mod:`.config` — the one config vocabulary (:class:`RunConfig`, whose field names are the flag names),
  the one device resolver (:func:`resolve_device`) and precision spelling (:func:`autocast_dtype`);
* :mod:`.runner` — :func:`run` of a :class:`Recipe`: the shell and outer loop every recipe shares;
* :mod:`.loop` — :func:`train_one_epoch`, :func:`evaluate`, :func:`check_finite` and friends.
"""

from .config import (
    PRECISIONS,
    ConfigError,
    RunConfig,
    autocast_dtype,
    config_dict,
    model_from_config,
    resolve_device,
)
from .distributed import DistContext, all_gather_objects, all_reduce_sum, cleanup_distributed, init_distributed
from .ema import build_ema, load_ema_weights
from .loop import (
    EpochStats,
    check_finite,
    evaluate,
    param_groups,
    sync_buffers,
    train_one_epoch,
    weights_digest,
)
from .metrics import Panel, append_metrics, json_safe, plot_metrics, read_metrics, truncate_metrics
from .runner import Progress, Recipe, RunInterrupted, run
from .schedule import SCHEDULES, build_lr_scheduler, lr_factor
from .seeding import derive_seed, seed_all, step_generator
from .state import (
    STATE_FORMAT,
    STATE_KEYS,
    atomic_write,
    capture_rng,
    load_state,
    restore_rank_rng,
    restore_rng,
    save_state,
    training_state,
    upgrade_state,
)

__all__ = [
    "PRECISIONS",
    "SCHEDULES",
    "STATE_FORMAT",
    "STATE_KEYS",
    "ConfigError",
    "DistContext",
    "EpochStats",
    "Panel",
    "Progress",
    "Recipe",
    "RunConfig",
    "RunInterrupted",
    "all_gather_objects",
    "all_reduce_sum",
    "append_metrics",
    "atomic_write",
    "autocast_dtype",
    "build_ema",
    "build_lr_scheduler",
    "capture_rng",
    "check_finite",
    "cleanup_distributed",
    "config_dict",
    "derive_seed",
    "evaluate",
    "init_distributed",
    "json_safe",
    "load_ema_weights",
    "load_state",
    "lr_factor",
    "model_from_config",
    "param_groups",
    "plot_metrics",
    "read_metrics",
    "resolve_device",
    "restore_rank_rng",
    "restore_rng",
    "run",
    "save_state",
    "seed_all",
    "step_generator",
    "sync_buffers",
    "train_one_epoch",
    "training_state",
    "truncate_metrics",
    "upgrade_state",
    "weights_digest",
]
