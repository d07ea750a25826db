"""The exponential moving average (EMA) of a model's weights, as every trainer keeps it.

The EMA is a :class:`torch.optim.swa_utils.AveragedModel`: the averaged copy is ``ema.module`` and
``ema.state_dict()`` holds that copy's entries under ``module.`` plus the ``n_averaged`` update counter,
so a checkpoint of it resumes exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["build_ema", "load_ema_weights"]


def build_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An EMA of ``model``'s parameters and buffers (a deep copy; ``model`` is not modified).

    Each ``ema.update_parameters(model)`` does ``ema = decay·ema + (1 − decay)·model``; the first one
    copies ``model``. Pass the bare model, not its ``DistributedDataParallel`` wrapper.
    """
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def load_ema_weights(model: nn.Module, state: Mapping[str, Any]) -> nn.Module:
    """Load the averaged weights of an EMA state dict (``build_ema(...).state_dict()``) into ``model``.

    The ``n_averaged`` counter, which only resuming needs, is dropped; the load is strict. Returns ``model``.
    """
    if "n_averaged" not in state:
        raise ValueError("not an EMA state dict (AveragedModel.state_dict()): it has no n_averaged entry")
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items() if k != "n_averaged"})
    return model
