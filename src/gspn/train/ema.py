"""Deprecated location: the EMA lives in :mod:`gspn.training_utils.ema`."""

from ..training_utils.ema import build_ema, load_ema_weights

__all__ = ["build_ema", "load_ema_weights"]
