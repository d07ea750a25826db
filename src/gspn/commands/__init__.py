"""The ``gspn`` command line: the only package that parses arguments.

Commands: ``train``, ``eval``, ``flops``, ``convert`` (:mod:`.classify`); ``train-dit``, ``sample``,
``extract-latents`` (:mod:`.diffusion`); ``distill``, ``generate`` (:mod:`.diffusers`); ``distill-encoder``
(:mod:`.distill_encoder`); ``bench`` (:mod:`.bench`). Every command spells a concept the same way
(:mod:`._flags`, ``docs/cli.md``).
``python -m gspn`` is the same program; multi-GPU / multi-node training goes through ``torchrun``::

    torchrun --standalone --nproc_per_node=8 -m gspn train --model gspn_t --data /data/imagenet
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

from ._flags import VOCABULARY, flag

__all__ = ["VOCABULARY", "build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (``gspn train: error: ...``), exit status 2,
    and which takes each option under its one name only (no prefix abbreviations)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


#: Optional modules and the extra of ``pyproject.toml`` that installs each.
_EXTRAS = {
    "sklearn": "data",
    "PIL": "data",
    "matplotlib": "plot",
    "diffusers": "diffusers",
    "transformers": "diffusers",
    "accelerate": "diffusers",
    "huggingface_hub": "hub",
    "triton": "triton",
    "tqdm": "data",
}


def build_parser() -> argparse.ArgumentParser:
    """The ``gspn`` argument parser (every command)."""
    from .. import __version__
    from . import bench, classify, diffusers, diffusion, distill_encoder

    parser = _Parser(prog="gspn", description="Generalized Spatial Propagation Networks")
    parser.add_argument("--version", action="version", version=f"gspn {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (also GSPN_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    classify.register(sub)
    bench.register(sub)
    diffusion.register(sub)
    diffusers.register(sub)
    distill_encoder.register(sub)
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.commands = dict(sub.choices)  # type: ignore[attr-defined]
    return parser


def _message(exc: BaseException, args: argparse.Namespace) -> str:
    """A library error as the command line says it: the config fields it names (the one in
    :class:`~gspn.training_utils.ConfigError`, and those in backticks) become their flags."""
    from ..training_utils import ConfigError

    text = f"{flag(exc.field)} {exc.message}" if isinstance(exc, ConfigError) else str(exc)
    return re.sub(r"`([a-z][a-z0-9_]*)`", lambda m: flag(m[1]) if hasattr(args, m[1]) else m[0], text)


def _debug(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("GSPN_DEBUG", "") not in ("", "0")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gspn`` console script and ``python -m gspn``; returns the exit status.

    Errors of the input (a bad value, a missing file, a refused folder) print one line and return 2; a
    diverged run 1; Ctrl-C 130. ``--debug`` (or ``GSPN_DEBUG=1``) shows the traceback instead. Python
    warnings print as one ``gspn COMMAND: warning: ...`` line.
    """
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the command's own parser: `gspn train: error: ... (see gspn train --help)`
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    warnings.formatwarning = lambda message, category, *_: f"gspn {args.command}: warning: {message}\n"
    threads = getattr(args, "threads", 0)
    if isinstance(threads, int) and threads < 0:
        print(f"gspn {args.command}: error: --threads must be >= 0, got {threads}", file=sys.stderr)
        return 2
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as exc:
        # Bad arguments or files (the library's errors name the field): a message, not a traceback.
        if _debug(args):
            raise
        print(f"gspn {args.command}: error: {_message(exc, args)}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # divergence: the run stopped before writing the bad state
        if _debug(args):
            raise
        print(f"gspn {args.command}: error: {_message(exc, args)}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top not in _EXTRAS or _debug(args):
            raise
        print(
            f"gspn {args.command}: error: this needs the optional package {top!r}: pip install 'gspn[{_EXTRAS[top]}]'",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt as exc:
        print(f"gspn {args.command}: {_message(exc, args) or 'interrupted'}", file=sys.stderr)
        return 130
