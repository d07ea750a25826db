"""The flag vocabulary of every ``gspn`` command: one name per concept, one parser per value type.

Each helper adds one concept's option to a parser under its one name (and, hidden from ``--help``,
its deprecated spellings, which still work and print a one-line note). :data:`VOCABULARY` lists the
names; ``docs/cli.md`` states the same table and ``tests/test_cli.py`` keeps the two in step.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .._validate import parse_model_args

__all__ = [
    "VOCABULARY",
    "add_alias",
    "add_batch_size",
    "add_checkpoint",
    "add_clip_grad",
    "add_device",
    "add_ema",
    "add_image_size",
    "add_in_channels",
    "add_model_args",
    "add_output_dir",
    "add_output_file",
    "add_precision",
    "add_threads",
    "add_warmup_epochs",
    "add_warmup_steps",
    "config_from_args",
    "device",
    "none_or_float",
    "parse_model_args",
    "precision",
]

#: Concept → the one flag that names it in every command (deprecated spellings still parse).
VOCABULARY: dict[str, tuple[str, tuple[str, ...]]] = {
    "output directory": ("--output-dir", ("--output", "--out")),
    "output file": ("--output", ("--out",)),
    "gradient clipping": ("--clip-grad", ("--grad-clip", "--max-grad-norm")),
    "warm-up (step-counted commands)": ("--warmup-steps", ("--warmup",)),
    "warm-up (epoch-counted commands)": ("--warmup-epochs", ()),
    "image size": ("--image-size", ("--img-size", "--resolution", "--size")),
    "input channels": ("--in-channels", ("--in-chans", "--channels")),
    "layer width (bench)": ("--dim", ("--channels",)),
    "checkpoint path": ("--checkpoint", ("--ckpt",)),
    "EMA weights on/off": ("--ema / --no-ema", ()),
    "precision": ("--precision", ("--amp", "--mixed-precision", "--dtype")),
    "batch size": ("--batch-size", ("--batch",)),
    "model constructor override": ("--model-arg KEY=VALUE", ()),
}


class _DeprecatedAlias(argparse.Action):
    """A hidden old spelling of an option: stores into the new option's ``dest`` and says so once."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str = "", **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(f"{parser.prog}: note: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_alias(parser: Any, old: str, new: str, dest: str, **kwargs: Any) -> None:
    """Accept ``old`` as a deprecated spelling of ``new`` (same ``dest``, hidden from ``--help``).

    ``kwargs`` are those of the new option that shape its value (``type``, ``nargs``, ``choices``).
    """
    parser.add_argument(
        old, action=_DeprecatedAlias, dest=dest, new=new, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs
    )


def none_or_float(text: str) -> float | None:
    """``none``/``off``/``0`` → ``None`` (disabled), else a float."""
    return None if text.lower() in ("none", "0", "off") else float(text)


_PRECISIONS = {
    "auto": "auto",
    "fp32": "fp32",
    "float32": "fp32",
    "off": "fp32",
    "no": "fp32",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
}


def precision(text: str) -> str:
    """Normalise a precision name: ``auto``, ``fp32`` (also ``float32``/``off``/``no``), ``bf16``
    (``bfloat16``), ``fp16`` (``float16``/``half``)."""
    try:
        return _PRECISIONS[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown precision {text!r}; choose auto, fp32, bf16 or fp16") from None


def _checked(choices: Sequence[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = precision(text)
        if value not in choices:
            raise argparse.ArgumentTypeError(f"precision {text!r} not available here; choose {', '.join(choices)}")
        return value

    return parse


def add_precision(
    parser: Any, choices: Sequence[str], default: str | None, help: str, aliases: Sequence[str] = ()
) -> None:
    """``--precision {choices}`` (deprecated spellings in ``aliases``, e.g. ``--amp``)."""
    kind = _checked(choices)
    parser.add_argument("--precision", type=kind, default=default, metavar="{" + ",".join(choices) + "}", help=help)
    for old in aliases:
        add_alias(parser, old, "--precision", "precision", type=kind)


def add_output_dir(
    parser: Any, default: str | None, help: str, aliases: Sequence[str] = (), type: Callable[[str], Any] = str
) -> None:
    """``--output-dir DIR``."""
    parser.add_argument("--output-dir", default=default, type=type, metavar="DIR", help=help)
    for old in aliases:
        add_alias(parser, old, "--output-dir", "output_dir", type=type)


def add_output_file(
    parser: Any, default: str | None, help: str, aliases: Sequence[str] = (), required: bool = False
) -> None:
    """``--output FILE``."""
    parser.add_argument("--output", default=default, metavar="FILE", help=help, required=required and not aliases)
    for old in aliases:
        add_alias(parser, old, "--output", "output")


def add_clip_grad(parser: Any, default: float | None, aliases: Sequence[str] = ()) -> None:
    """``--clip-grad NORM`` (``none``/``0`` disables; ``dest`` ``clip_grad``, ``None`` when off)."""
    parser.add_argument(
        "--clip-grad",
        type=none_or_float,
        default=default,
        metavar="NORM",
        help="max gradient norm ('none' or 0 disables)",
    )
    for old in aliases:
        add_alias(parser, old, "--clip-grad", "clip_grad", type=none_or_float)


def add_warmup_steps(parser: Any, default: int, aliases: Sequence[str] = ()) -> None:
    """``--warmup-steps N``: linear learning-rate warm-up in optimizer steps."""
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=default,
        metavar="N",
        help="linear learning-rate warm-up, in optimizer steps",
    )
    for old in aliases:
        add_alias(parser, old, "--warmup-steps", "warmup_steps", type=int)


def add_warmup_epochs(parser: Any, default: float) -> None:
    """``--warmup-epochs E``: linear warm-up in epochs (applied per step)."""
    parser.add_argument(
        "--warmup-epochs",
        type=float,
        default=default,
        metavar="E",
        help="linear learning-rate warm-up, in epochs (per-step schedule)",
    )


def add_image_size(parser: Any, default: Any, help: str, aliases: Sequence[str] = (), nargs: str | None = None) -> None:
    """``--image-size PIXELS`` (``nargs='+'``: ``SIDE`` or ``H W``)."""
    kw: dict[str, Any] = {"type": int}
    if nargs:
        kw["nargs"] = nargs
    parser.add_argument("--image-size", default=default, metavar="PIXELS", help=help, **kw)
    for old in aliases:
        add_alias(parser, old, "--image-size", "image_size", **kw)


def add_in_channels(
    parser: Any, default: int | None, help: str, aliases: Sequence[str] = (), choices: Sequence[int] | None = None
) -> None:
    """``--in-channels C``: input (image) channels."""
    parser.add_argument("--in-channels", type=int, default=default, choices=choices, metavar="C", help=help)
    for old in aliases:
        add_alias(parser, old, "--in-channels", "in_channels", type=int, choices=choices)


def add_checkpoint(parser: Any, help: str, required: bool = True, aliases: Sequence[str] = ()) -> None:
    """``--checkpoint PATH``."""
    parser.add_argument("--checkpoint", default=None, required=required and not aliases, metavar="PATH", help=help)
    for old in aliases:
        add_alias(parser, old, "--checkpoint", "checkpoint")


def add_ema(parser: Any, default: bool, help: str) -> None:
    """``--ema`` / ``--no-ema``."""
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=default, help=help)


def add_batch_size(parser: Any, default: int | None, help: str, aliases: Sequence[str] = ()) -> None:
    """``--batch-size N``."""
    parser.add_argument("--batch-size", type=int, default=default, metavar="N", help=help)
    for old in aliases:
        add_alias(parser, old, "--batch-size", "batch_size", type=int)


def add_model_args(
    parser: Any, help: str = "constructor override (repeatable); values are Python literals, e.g. depths=(1,1)"
) -> None:
    """``--model-arg KEY=VALUE`` (repeatable; parsed by :func:`parse_model_args`)."""
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE", help=help)


def add_resume(
    parser: Any, help: str = "resume from a checkpoint; without a path, from <output-dir>/last.pt if it exists"
) -> None:
    """``--resume [CHECKPOINT]``: ``"auto"`` without a value (the run folder's ``last.pt``), a path with
    one, ``None`` when absent."""
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT", help=help)


def add_overwrite(parser: Any, help: str = "replace the run already in the output directory") -> None:
    """``--overwrite``: replace an existing run instead of refusing to start."""
    parser.add_argument("--overwrite", action="store_true", help=help)


def add_stop_after_epochs(parser: Any, help: str) -> None:
    """``--stop-after-epochs N`` (``None`` when absent)."""
    parser.add_argument("--stop-after-epochs", type=int, default=None, metavar="N", help=help)


def add_threads(parser: Any, default: int | None = 0) -> None:
    """``--threads N``: torch CPU threads (0 = torch's default)."""
    parser.add_argument("--threads", type=int, default=default, help="torch CPU threads (0 = torch default)")


def device(text: str) -> str:
    """A ``--device`` value: ``auto`` or a name :class:`torch.device` accepts (``cpu``, ``cuda``, ``cuda:1``,
    ...), returned unchanged; anything else is a usage error (one line, exit status 2) instead of torch's
    ``RuntimeError`` traceback after the data and model are loaded."""
    if text == "auto":
        return text
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use auto, cpu, cuda or cuda:N") from None
    return text


def add_device(parser: Any, default: str | None = "auto", help: str = "auto | cpu | cuda | cuda:N") -> None:
    """``--device`` (checked by :func:`device`)."""
    parser.add_argument("--device", type=device, default=default, help=help)


def config_from_args(cls: type[Any], args: Any, **overrides: Any) -> Any:
    """The recipe config dataclass ``cls`` of parsed ``args``: each field from the flag of the same
    name (``model_args`` from the parsed ``--model-arg`` list), then ``overrides``."""
    import dataclasses

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    if any(f.name == "model_args" for f in dataclasses.fields(cls)) and hasattr(args, "model_arg"):
        values["model_args"] = parse_model_args(args.model_arg)
    values.update(overrides)
    return cls(**values)
