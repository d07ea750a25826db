"""Deprecated location: the training-state functions live in :mod:`gspn.training_utils.state`."""

from ..training_utils.state import atomic_write, capture_rng, load_state, restore_rng, save_state

__all__ = ["atomic_write", "capture_rng", "load_state", "restore_rng", "save_state"]
