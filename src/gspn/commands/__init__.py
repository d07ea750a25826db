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
import sys
from collections.abc import Sequence
from typing import NoReturn

from ._flags import VOCABULARY, parse_model_args

__all__ = ["VOCABULARY", "build_parser", "main", "parse_model_args"]


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (``gspn train: error: ...``), exit status 2."""

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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    classify.register(sub)
    bench.register(sub)
    diffusion.register(sub)
    diffusers.register(sub)
    distill_encoder.register(sub)
    return parser


def _missing_required(args: argparse.Namespace) -> str | None:
    """Options required under their new name or a deprecated one (argparse cannot say "one of")."""
    for dest in getattr(args, "_required", ()):
        if getattr(args, dest, None) is None:
            return "--" + dest.replace("_", "-")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gspn`` console script and ``python -m gspn``; returns the exit status."""
    args = build_parser().parse_args(argv)
    missing = _missing_required(args)
    if missing:
        print(f"gspn {args.command}: error: the following arguments are required: {missing}", file=sys.stderr)
        return 2
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
        # Bad arguments or files (the library's errors name the argument): a message, not a traceback.
        print(f"gspn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # divergence: the run stopped before writing the bad state
        print(f"gspn {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top not in _EXTRAS:
            raise
        print(
            f"gspn {args.command}: error: this needs the optional package {top!r}: pip install 'gspn[{_EXTRAS[top]}]'",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"gspn {args.command}: interrupted", file=sys.stderr)
        return 130
