"""Deprecated location: the metrics log and plot live in :mod:`gspn.training_utils.metrics`."""

from ..training_utils.metrics import (
    CLASSIFIER_PANELS,
    Panel,
    append_metrics,
    plot_metrics,
    read_metrics,
    truncate_metrics,
)

__all__ = ["CLASSIFIER_PANELS", "Panel", "append_metrics", "plot_metrics", "read_metrics", "truncate_metrics"]
