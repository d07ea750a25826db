"""The ``gspn`` command line: ``gspn <command> [options]``.

Commands registered here: ``train-dit``, ``sample``, ``extract-latents`` (diffusion, see
:mod:`gspn.diffusion`). Each command module exposes ``add_*_arguments(parser)`` and
``run_*(args)``; more commands are added by registering them in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Sequence

__all__ = ["COMMANDS", "build_parser", "main"]

# name → (module, add-arguments function, run function, help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "train-dit": (
        "gspn.diffusion.train",
        "add_train_arguments",
        "run_train",
        "train a class-conditional GSPN-DiT (digits, ImageFolder or latents)",
    ),
    "sample": (
        "gspn.diffusion.sample",
        "add_sample_arguments",
        "run_sample",
        "sample images from a GSPN-DiT checkpoint",
    ),
    "extract-latents": (
        "gspn.diffusion.latents",
        "add_extract_latents_arguments",
        "run_extract_latents",
        "encode a dataset with a diffusers AutoencoderKL",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="gspn", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, add, run, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        mod = importlib.import_module(module)
        getattr(mod, add)(p)
        p.set_defaults(_run=getattr(mod, run))
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Parse ``argv`` and run the command; its summary is printed as JSON."""
    args = build_parser().parse_args(argv)
    result = args._run(args)
    if result:
        print(json.dumps({k: v for k, v in result.items() if k != "labels"}, default=str))


if __name__ == "__main__":
    main()
