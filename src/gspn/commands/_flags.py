"""The flag vocabulary of every ``gspn`` command: one name per concept, one parser per value type.

A flag's name is the field name of the recipe config it sets (``--output-dir`` ↔ ``output_dir``), so
:func:`config_from_args` maps a parsed command line to a config by name alone. :data:`VOCABULARY` lists
the concepts; ``docs/cli.md`` states the same table and the command tests keep the two in step.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from collections.abc import Callable, Sequence
from typing import Any

from .._validate import parse_model_args

__all__ = [
    "VOCABULARY",
    "add_batch_size",
    "add_checkpoint",
    "add_clip_grad",
    "add_device",
    "add_ema",
    "add_epoch_training",
    "add_image_size",
    "add_in_channels",
    "add_model_args",
    "add_output_dir",
    "add_output_file",
    "add_precision",
    "add_recipe_command",
    "add_resume",
    "add_run_output",
    "add_threads",
    "add_warmup_epochs",
    "add_warmup_steps",
    "config_defaults",
    "config_from_args",
    "device",
    "flag",
    "none_or_float",
    "parse_model_args",
]

#: Concept → the one flag that names it in every command.
VOCABULARY: dict[str, str] = {
    "output directory": "--output-dir",
    "output file": "--output",
    "gradient clipping": "--clip-grad",
    "warm-up (step-counted commands)": "--warmup-steps",
    "warm-up (epoch-counted commands)": "--warmup-epochs",
    "image size": "--image-size",
    "input channels": "--in-channels",
    "layer width (bench)": "--dim",
    "checkpoint path": "--checkpoint",
    "EMA weights on/off": "--ema / --no-ema",
    "precision": "--precision",
    "batch size": "--batch-size",
    "model constructor override": "--model-arg KEY=VALUE",
    "continue a run": "--resume [CHECKPOINT]",
    "progress bar on/off": "--progress / --no-progress",
}


def flag(field: str) -> str:
    """The command-line flag of a config field (``clip_grad`` → ``--clip-grad``; the repeatable
    ``--model-arg KEY=VALUE`` fills ``model_args``)."""
    return "--model-arg" if field == "model_args" else "--" + field.replace("_", "-")


def none_or_float(text: str) -> float | None:
    """``none``/``off``/``0`` → ``None`` (disabled), else a float."""
    return None if text.lower() in ("none", "0", "off") else float(text)


def add_precision(parser: Any, choices: Sequence[str], default: str | None, help: str) -> None:
    """``--precision {choices}`` (names from :data:`gspn.training_utils.PRECISIONS`)."""
    parser.add_argument("--precision", choices=tuple(choices), default=default, help=help)


def add_output_dir(parser: Any, default: str | None, help: str, type: Any = str) -> None:
    """``--output-dir DIR``."""
    parser.add_argument("--output-dir", default=default, type=type, metavar="DIR", help=help)


def add_output_file(parser: Any, default: str | None, help: str, required: bool = False) -> None:
    """``--output FILE``."""
    parser.add_argument("--output", default=default, metavar="FILE", help=help, required=required)


def add_clip_grad(parser: Any, default: float | None) -> None:
    """``--clip-grad NORM`` (``none``/``0`` disables; ``dest`` ``clip_grad``, ``None`` when off)."""
    parser.add_argument(
        "--clip-grad",
        type=none_or_float,
        default=default,
        metavar="NORM",
        help="max gradient norm ('none' or 0 disables)",
    )


def add_warmup_steps(parser: Any, default: int) -> None:
    """``--warmup-steps N``: linear learning-rate warm-up in optimizer steps."""
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=default,
        metavar="N",
        help="linear learning-rate warm-up, in optimizer steps",
    )


def add_warmup_epochs(parser: Any, default: float) -> None:
    """``--warmup-epochs E``: linear warm-up in epochs (applied per step)."""
    parser.add_argument(
        "--warmup-epochs",
        type=float,
        default=default,
        metavar="E",
        help="linear learning-rate warm-up, in epochs (per-step schedule)",
    )


def add_image_size(parser: Any, default: Any, help: str, nargs: str | None = None) -> None:
    """``--image-size PIXELS`` (``nargs='+'``: ``SIDE`` or ``H W``)."""
    kw: dict[str, Any] = {"type": int}
    if nargs:
        kw["nargs"] = nargs
    parser.add_argument("--image-size", default=default, metavar="PIXELS", help=help, **kw)


def add_in_channels(parser: Any, default: int | None, help: str, choices: Sequence[int] | None = None) -> None:
    """``--in-channels C``: input (image) channels."""
    parser.add_argument("--in-channels", type=int, default=default, choices=choices, metavar="C", help=help)


def add_checkpoint(parser: Any, help: str, required: bool = True) -> None:
    """``--checkpoint PATH``."""
    parser.add_argument("--checkpoint", default=None, required=required, metavar="PATH", help=help)


def add_ema(parser: Any, default: bool, help: str) -> None:
    """``--ema`` / ``--no-ema``."""
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=default, help=help)


def add_batch_size(parser: Any, default: int | None, help: str) -> None:
    """``--batch-size N``."""
    parser.add_argument("--batch-size", type=int, default=default, metavar="N", help=help)


def add_model_args(
    parser: Any, help: str = "constructor override (repeatable); values are Python literals, e.g. depths=(1,1)"
) -> None:
    """``--model-arg KEY=VALUE`` (repeatable; parsed by :func:`parse_model_args`)."""
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE", help=help)


def add_resume(
    parser: Any, help: str = "continue the run: without a value from <output-dir>/last.pt (if present), else CHECKPOINT"
) -> None:
    """``--resume [CHECKPOINT]`` (``"auto"`` without a value, a path with one, ``None`` when absent),
    ``--overwrite`` and ``--allow-changes``."""
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT", help=help)
    parser.add_argument("--overwrite", action="store_true", help="replace the run already in the output directory")
    parser.add_argument(
        "--allow-changes",
        action="store_true",
        help="resume even though settings differ from the saved run's (they are listed first)",
    )


def add_run_output(parser: Any, plot: bool = False, quiet: bool = False) -> None:
    """``--progress/--no-progress`` (and ``--plot/--no-plot``, ``--quiet`` where the command has them)."""
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="the progress bar")
    if plot:
        parser.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="draw metrics.png")
    if quiet:
        parser.add_argument("--quiet", action="store_true", help="print nothing but errors")


def add_recipe_command(
    sub: Any,
    name: str,
    help: str,
    add_flags: Callable[[argparse.ArgumentParser], None],
    recipe: str,
    config: str,
    description: str | None = None,
    formatter_class: type[argparse.HelpFormatter] = argparse.ArgumentDefaultsHelpFormatter,
) -> argparse.ArgumentParser:
    """Sub-command ``name``: its flags from ``add_flags(parser)``; its action is the recipe's
    ``run(config_from_args(Config, args))``, with module ``gspn.<recipe>`` and its config class ``config``
    imported when the command runs. Returns the sub-parser."""
    parser = sub.add_parser(name, help=help, description=description or help, formatter_class=formatter_class)
    add_flags(parser)

    def action(args: argparse.Namespace) -> int:
        module = importlib.import_module(f"gspn.{recipe}")
        module.run(config_from_args(getattr(module, config), args))
        return 0

    parser.set_defaults(func=action)
    return parser


def config_defaults(cls: type[Any]) -> dict[str, Any]:
    """The default of every field of the config dataclass ``cls`` that has one (a flag's default is its
    field's: one source of truth)."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def add_epoch_training(data: Any, optimisation: Any, run: Any, cls: type[Any]) -> None:
    """The flags of an epoch-based recipe's shared fields (:class:`gspn.training_utils.supervised.EpochRunConfig`),
    with ``cls``'s defaults: ``data`` gets the loader flags, ``optimisation`` the AdamW / schedule /
    precision flags, ``run`` the resume, limit, seed, device, DDP and output flags."""
    d = config_defaults(cls)
    data.add_argument("--workers", type=int, default=d["workers"], help="DataLoader processes per training process")
    data.add_argument("--train-limit", type=int, default=d["train_limit"], help="use only this many training images")
    data.add_argument("--val-limit", type=int, default=d["val_limit"], help="use only this many validation images")
    add_batch_size(optimisation, d["batch_size"], "per process")
    optimisation.add_argument("--lr", type=float, default=d["lr"], help="peak AdamW learning rate")
    optimisation.add_argument("--min-lr", type=float, default=d["min_lr"], help="final learning rate of the cosine")
    optimisation.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    add_warmup_epochs(optimisation, d["warmup_epochs"])
    optimisation.add_argument("--label-smoothing", type=float, default=d["label_smoothing"])
    add_clip_grad(optimisation, d["clip_grad"])
    add_precision(
        optimisation,
        ("auto", "fp32", "bf16", "fp16"),
        d["precision"],
        help="autocast dtype (auto: bf16 on a GPU that supports it, else fp16 with a grad scaler; float32 off the "
        "GPU; bf16 also autocasts on the CPU)",
    )
    add_resume(run)
    run.add_argument(
        "--stop-after-epochs",
        type=int,
        default=d["stop_after_epochs"],
        metavar="N",
        help="stop after N epochs of this invocation (for time-limited jobs); the schedule still spans "
        "--epochs and --resume continues",
    )
    run.add_argument("--seed", type=int, default=d["seed"])
    add_device(run, help="auto | cpu | cuda | cuda:N (torchrun: auto and cuda are cuda:LOCAL_RANK)")
    run.add_argument(
        "--dist-backend", default=d["dist_backend"], help="torch.distributed backend (None: nccl on GPU, gloo on CPU)"
    )
    add_threads(run)
    add_run_output(run, plot=True, quiet=True)


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


def config_from_args(cls: type[Any], args: argparse.Namespace, **overrides: Any) -> Any:
    """The recipe config dataclass ``cls`` of parsed ``args``: each field from the flag of the same name
    (``model_args`` from the parsed ``--model-arg`` list), then ``overrides``; a field without a flag
    keeps its default."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    if "model_args" in names and hasattr(args, "model_arg"):
        values["model_args"] = parse_model_args(args.model_arg)
    values.update(overrides)
    return cls(**values)
