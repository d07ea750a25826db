"""The training baselines now live in the model registry (:mod:`gspn.models.baselines`); this module
re-exports them for existing imports."""

from ..models.baselines import BASELINES, ConvBaseline, ViTBaseline, count_params, match_params

__all__ = ["BASELINES", "ConvBaseline", "ViTBaseline", "count_params", "match_params"]
