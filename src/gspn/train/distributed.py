"""Deprecated location: the ``torchrun``/DDP helpers live in :mod:`gspn.training_utils.distributed`."""

from ..training_utils.distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_sum,
    cleanup_distributed,
    init_distributed,
)

__all__ = ["DistContext", "all_gather_objects", "all_reduce_sum", "cleanup_distributed", "init_distributed"]
