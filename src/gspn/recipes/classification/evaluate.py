"""``gspn eval``: loss and accuracy of a classification training state on its validation set."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..._validate import ConfigError, check_int
from ...datasets import build_data
from ...training_utils import STATE_FORMAT, evaluate, load_ema_weights, load_state, resolve_device
from ...training_utils.supervised import data_loader
from .models import build_model

__all__ = ["evaluate_checkpoint"]


#: Entries of a classification training state that evaluation reads (beyond the shared state keys).
_EVAL_KEYS = ("model_name", "model_args", "num_classes", "in_chans", "img_size", "mean", "std", "data", "config")


def evaluate_checkpoint(
    checkpoint: str | os.PathLike[str],
    data: str | None = None,
    batch_size: int = 128,
    workers: int = 2,
    use_ema: bool = False,
    device: str = "auto",
    val_limit: int | None = None,
) -> dict[str, Any]:
    """Loss and accuracy of a training checkpoint on its validation set (or on ``data``'s).

    The data are prepared as in training (image size, channels, normalisation, ``val_limit``) unless
    overridden here. ``checkpoint`` is a ``last.pt`` / ``best.pt`` or the run folder (its ``best.pt``).

    Raises:
        ConfigError: ``checkpoint`` names no file, or a setting is out of range.
        ValueError: the file is not a classifier's training state.
    """
    check_int("batch_size", batch_size)
    check_int("workers", workers, minimum=0)
    check_int("val_limit", val_limit, allow_none=True)
    path = Path(checkpoint)
    if path.is_dir():
        path = next((path / n for n in ("best.pt", "last.pt") if (path / n).is_file()), path / "best.pt")
    if not path.is_file():
        raise ConfigError("checkpoint", f"names no file: {path}")
    checkpoint = path
    ckpt = load_state(checkpoint)
    if not isinstance(ckpt, dict) or ckpt.get("format") != STATE_FORMAT:
        raise ValueError(f"{checkpoint} is not a gspn training checkpoint")
    missing = [k for k in _EVAL_KEYS if k not in ckpt]
    if missing:  # the same state format as gspn train-dit / distill: their files lack the data setup
        raise ValueError(
            f"{checkpoint} is not a classifier's training checkpoint of `gspn train` (it holds "
            f"{ckpt.get('model_name', 'no model name')!r}, without {', '.join(missing)})"
        )
    dev = resolve_device(device)
    model = build_model(
        ckpt["model_name"], num_classes=ckpt["num_classes"], in_chans=ckpt["in_chans"], **ckpt["model_args"]
    )
    if use_ema:
        if ckpt.get("ema") is None:
            raise ValueError(f"{checkpoint} has no EMA weights (it was trained without ema_decay)")
        load_ema_weights(model, ckpt["ema"])
    else:
        model.load_state_dict(ckpt["model"])
    model.to(dev)
    bundle = build_data(
        data or ckpt["data"],
        img_size=ckpt["img_size"],
        in_chans=ckpt["in_chans"],
        mean=ckpt["mean"],
        std=ckpt["std"],
        crop_pct=ckpt["config"].get("crop_pct"),
        val_limit=val_limit if val_limit is not None else ckpt["config"].get("val_limit"),
    )
    if bundle.num_classes != ckpt["num_classes"]:
        raise ValueError(f"the data has {bundle.num_classes} classes, the checkpoint {ckpt['num_classes']}")
    loader = data_loader(bundle.val, batch_size, workers, dev)
    res = evaluate(model, loader, dev)
    return {
        "checkpoint": str(checkpoint),
        "model": ckpt["model_name"],
        "epoch": ckpt["epoch"],
        "ema": use_ema,
        "data": bundle.source,
        "val_loss": res["loss"],
        "val_acc": res["acc"],
        "n": res["n"],
    }
