"""Up-front checks of user-facing settings: each failure is one :class:`ConfigError` naming the setting.

Recipes call these before any work, so a nonsense value never trains, samples or writes. A setting is
named by its config field (``clip_grad``); the command line shows it as its flag (``--clip-grad``).
"""

from __future__ import annotations

import ast
import math
from collections.abc import Sequence
from typing import Any

__all__ = ["ConfigError", "check_choice", "check_int", "check_number", "parse_model_args"]


class ConfigError(ValueError):
    """A config field holds a value the recipe cannot run with.

    ``str()`` is ``"<field> <message>"`` (the message is a predicate: ``"lr must be > 0"``); :attr:`field`
    is the field's name. The message names other fields in backticks (```in_channels```); the command line
    shows all of them as flags (``--lr must be > 0``).
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field} {message}")


def check_int(name: str, value: Any, minimum: int = 1, allow_none: bool = False) -> None:
    """Field ``name``'s ``value`` must be an integer ``>= minimum`` (or ``None`` when ``allow_none``).

    Raises:
        ConfigError: naming ``name``.
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(name, f"must be {kind}, got {value!r}")


def check_number(
    name: str,
    value: Any,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    allow_none: bool = False,
) -> None:
    """``value`` must be a finite number in the given range (``lo``/``hi`` inclusive unless ``*_open``)."""
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        if lo is not None and hi is not None:
            where = f" in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        elif lo is not None:
            where = f" {'>' if lo_open else '>='} {lo:g}"
        elif hi is not None:
            where = f" {'<' if hi_open else '<='} {hi:g}"
        else:
            where = ""
        raise ConfigError(name, f"must be a finite number{where}, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    """``value`` must be one of ``choices``."""
    if value not in choices:
        raise ConfigError(name, f"must be one of {', '.join(map(str, choices))}, got {value!r}")


def parse_model_args(items: Sequence[str] | None) -> dict[str, Any]:
    """Parse ``--model-arg KEY=VALUE`` strings, the one parser of every command.

    Values are Python literals (``depths=(1,1)``, ``drop=0.1``, ``act='gelu'``); JSON spellings of the
    constants (``true``, ``false``, ``null``) and JSON lists work too; anything else is a string.

    >>> parse_model_args(["depth=2", "depths=(1,1)", "act=gelu", "learn_sigma=false"])
    {'depth': 2, 'depths': (1, 1), 'act': 'gelu', 'learn_sigma': False}
    """
    constants = {"true": True, "false": False, "null": None, "none": None}
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError("model_args", f"expects KEY=VALUE items, got {item!r}")
        if value.strip().lower() in constants:
            out[key] = constants[value.strip().lower()]
            continue
        try:
            out[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key] = value
    return out
