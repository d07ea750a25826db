"""The layer benchmark (``gspn bench``): one GSPN layer against attention, linear attention and Mamba as the
resolution grows — the shape of the GSPN paper's speed figure, on the user's own hardware.

* :class:`BenchConfig` + :func:`run` — the job: check the settings (:func:`resolve_settings`), time every
  method at every size (:func:`benchmark`), print the tables and ratios, write ``results.json``,
  ``table.md`` and ``scaling.png``; returns what ``results.json`` holds.
* :mod:`.methods` — what is timed (:data:`METHODS`, :class:`MethodSpec`, :class:`LayerConfig`);
  :mod:`.timing` — the timing loop and its skip rules (:class:`Result`); :mod:`.report` — fits, ratios and
  tables; :mod:`.plot` — the log-log plot.

A plain job, not a :class:`gspn.training_utils.Recipe`: nothing to resume, no loss, no run folder to claim.
"""

from .config import BenchConfig, resolutions_up_to, resolve_settings
from .job import run
from .methods import (
    DEFAULT_METHODS,
    METHODS,
    LayerConfig,
    LinearAttention,
    MethodSpec,
    SelfAttention,
    Workload,
    get_method,
    iter_methods,
    linear_attention,
)
from .report import exponents, fit_exponent, format_table, ratios, write_json
from .timing import Result, benchmark

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "BenchConfig",
    "LayerConfig",
    "LinearAttention",
    "MethodSpec",
    "Result",
    "SelfAttention",
    "Workload",
    "benchmark",
    "exponents",
    "fit_exponent",
    "format_table",
    "get_method",
    "iter_methods",
    "linear_attention",
    "ratios",
    "resolutions_up_to",
    "resolve_settings",
    "run",
    "write_json",
]
