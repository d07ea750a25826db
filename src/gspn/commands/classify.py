"""``gspn train``, ``gspn eval``, ``gspn flops``, ``gspn convert`` (classification and model tools)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from . import _flags as F

__all__ = ["register"]


def _floats(n: int):
    def parse(s: str) -> tuple[float, ...]:
        vals = tuple(float(v) for v in s.replace(",", " ").split())
        if n and len(vals) != n:
            raise argparse.ArgumentTypeError(f"expected {n} comma-separated numbers, got {s!r}")
        return vals

    return parse


def register(sub: Any) -> None:
    """Add ``train``, ``eval``, ``flops`` and ``convert`` to the ``gspn`` sub-parsers."""
    _add_train(sub)
    _add_eval(sub)
    _add_flops(sub)
    _add_convert(sub)


def _add_train(sub: Any) -> None:
    F.add_recipe_command(
        sub,
        "train",
        "train a classifier",
        _add_train_flags,
        "recipes.classification",
        "ClassificationConfig",
        description="Train a classifier on the bundled digits or an ImageFolder directory. "
        "Launch with torchrun for DDP (one process per GPU; gloo on CPU).",
    )


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    from ..recipes.classification import ClassificationConfig

    g = p.add_argument_group("model")
    g.add_argument(
        "--model", default="gspn_micro", help="registered classifier (gspn.list_models(task='classification'))"
    )
    F.add_model_args(g)
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default="digits",
        help="'digits' (scikit-learn's bundled 8x8 digits, upsampled) or an ImageFolder root "
        "with train/<class>/* and val/<class>/*",
    )
    F.add_image_size(g, None, "input side (default: 32 for digits, else the model's)")
    F.add_in_channels(g, 3, "input channels (digits: any; folders: 1 or 3)")
    g.add_argument("--hflip", type=float, default=None, help="horizontal flip probability (digits: 0, else 0.5)")
    g.add_argument(
        "--crop-scale",
        type=_floats(2),
        default=None,
        metavar="LO,HI",
        help="random-resized-crop area range (digits: 0.7,1; else 0.08,1)",
    )
    g.add_argument("--crop-pct", type=float, default=None, help="eval centre-crop fraction (digits: 1, else 0.875)")
    g.add_argument("--mean", type=_floats(0), default=None, help="normalisation mean, comma-separated")
    g.add_argument("--std", type=_floats(0), default=None, help="normalisation std, comma-separated")
    data = g
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=30)
    g.add_argument("--ema-decay", type=float, default=None, help="keep an EMA of the weights with this decay")
    optimisation = g
    g = p.add_argument_group("run")
    F.add_output_dir(g, None, "output directory (None: runs/<model>)")
    F.add_epoch_training(data, optimisation, g, ClassificationConfig)


def _add_eval(sub: Any) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a training checkpoint", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    F.add_checkpoint(p, "a last.pt / best.pt written by gspn train")
    p.add_argument("--data", default=None, help="override the checkpoint's data (digits or an ImageFolder root)")
    F.add_batch_size(p, 128, "images per batch")
    p.add_argument("--workers", type=int, default=2)
    F.add_ema(p, False, "evaluate the EMA weights")
    F.add_device(p)
    p.add_argument("--val-limit", type=int, default=None)
    F.add_threads(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from ..recipes.classification import evaluate_checkpoint

    res = evaluate_checkpoint(
        args.checkpoint,
        data=args.data,
        batch_size=args.batch_size,
        workers=args.workers,
        use_ema=args.ema,
        device=args.device,
        val_limit=args.val_limit,
    )
    if args.json:
        print(json.dumps(res))
    else:
        print(
            f"{res['model']} (epoch {res['epoch'] + 1}{', EMA' if res['ema'] else ''}) on {res['data']}: "
            f"val loss {res['val_loss']:.4f}, val acc {100 * res['val_acc']:.2f}% ({res['n']} images)"
        )
    return 0


def _add_flops(sub: Any) -> None:
    p = sub.add_parser(
        "flops",
        help="print parameters and MACs per model",
        description="Parameters and multiply-accumulates of one forward pass (the GSPN papers' convention: "
        "convolutions, linears and matmuls, plus the line scans). Classifiers and diffusion models; each "
        "model at its own default input unless --image-size / --in-channels are given.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", nargs="+", default=None, help="model names (default: every registered model)")
    F.add_image_size(p, None, "SIDE or H W (default: the model's, e.g. 224)", nargs="+")
    F.add_in_channels(p, None, "input channels (default: the model's)")
    p.add_argument("--num-classes", type=int, default=None, help="classes (default: the model's)")
    F.add_batch_size(p, 1, "batch of the counted forward pass")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    p.set_defaults(func=_cmd_flops)


def _cmd_flops(args: argparse.Namespace) -> int:
    import torch

    from ..models import create_model, get_default_cfg
    from ..models.complexity import complexity
    from ..recipes.classification import available_models, build_model, model_task

    names = args.model or [n for n in available_models(task=None) if not n.startswith("baseline_")]
    sides = args.image_size or []
    if len(sides) > 2:
        raise ValueError(f"--image-size takes SIDE or H W, got {len(sides)} numbers")
    for flag, values in (
        ("image_size", sides),
        *((f, [getattr(args, f)]) for f in ("in_channels", "num_classes", "batch_size")),
    ):
        for value in values:
            if value is not None and value < 1:
                raise ValueError(f"{F.flag(flag)} must be a positive integer, got {value}")
    tasks = {name: model_task(name) for name in names}  # every name checked before any output
    if not args.json:
        print(f"{'model':<20} {'input':>14} {'params (M)':>12} {'GMACs':>10} {'paper params':>14} {'paper GMACs':>12}")
    for name, task in tasks.items():
        cfg = {} if name.startswith("baseline_") else get_default_cfg(name)
        default_chans, default_size = cfg.get("input_size", (3, 224, 224))[:2]
        hw = (sides * 2)[:2] if sides else [default_size, default_size]
        size = (args.in_channels or default_chans, hw[0], hw[1])
        num_classes = args.num_classes or cfg.get("num_classes", 1000)
        with torch.device("meta"):  # shapes only: no memory, no compute
            if task == "diffusion":
                model = create_model(name, in_channels=size[0], input_size=size[1], num_classes=num_classes)
            else:
                model = build_model(name, num_classes=num_classes, in_chans=size[0])
        c = complexity(model, input_size=size, batch=args.batch_size)
        if args.json:
            record = {
                "model": name,
                "task": task,
                "input_size": list(size),
                "batch": args.batch_size,
                "params": int(c["params"]),
                "macs": int(c["macs"]),
            }
            print(json.dumps(record))
        else:
            shape = f"{args.batch_size}x{size[0]}x{size[1]}x{size[2]}"
            ref_p = f"{cfg['reference_params']:,}" if "reference_params" in cfg else "-"
            ref_m = f"{cfg['reference_gmacs']:.2f}" if "reference_gmacs" in cfg else "-"
            print(f"{name:<20} {shape:>14} {c['params'] / 1e6:>12.3f} {c['macs'] / 1e9:>10.3f} {ref_p:>14} {ref_m:>12}")
    return 0


def _add_convert(sub: Any) -> None:
    p = sub.add_parser(
        "convert",
        help="convert an official GSPN checkpoint (.pth of the authors' code) to a .safetensors file",
        description="Convert a checkpoint of the reference code (NVlabs/GSPN: classifier or GSPN-DiT) into "
        "this library's safetensors format, with the architecture, the constructor arguments (reference "
        "semantics included) and the source as metadata; gspn.models.load_model(OUT) then rebuilds the model "
        "without unpickling anything. The .pth is read through an allow-list: a file whose pickle could run "
        "code is refused.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("src", help="reference checkpoint (.pth: training checkpoint or bare state dict)")
    p.add_argument("out", help="output .safetensors")
    p.add_argument(
        "--model",
        default=None,
        help="registered model, e.g. gspn_t or gspn_dit_xl_2 (default: inferred from the tensor shapes)",
    )
    p.add_argument(
        "--entry",
        default=None,
        help="state dict to convert: classifier 'model' (default) or 'model_ema'; generator 'ema' (default) or 'model'",
    )
    F.add_model_args(p, "constructor override for other reference configurations (repeatable; Python literals)")
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    from ..models.convert import convert_checkpoint

    out = convert_checkpoint(args.src, args.out, args.model, entry=args.entry, **F.parse_model_args(args.model_arg))
    print(json.dumps({"output": str(out), "src": args.src, "model": args.model or "inferred"}))
    return 0
