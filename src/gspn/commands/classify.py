"""``gspn train``, ``gspn eval``, ``gspn flops``, ``gspn convert`` (classification and model tools)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from . import _flags as F

__all__ = ["models_table", "register"]


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
    p = sub.add_parser(
        "train",
        help="train a classifier",
        description="Train a classifier on the bundled digits or an ImageFolder directory. "
        "Launch with torchrun for DDP (one process per GPU; gloo on CPU).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
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
    F.add_image_size(g, None, "input side (default: 32 for digits, else the model's)", aliases=("--img-size",))
    F.add_in_channels(g, 3, "input channels (digits: any; folders: 1 or 3)", aliases=("--in-chans",))
    g.add_argument("--workers", type=int, default=2, help="DataLoader worker processes per training process")
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
    g.add_argument("--train-limit", type=int, default=None, help="use only this many training images")
    g.add_argument("--val-limit", type=int, default=None, help="use only this many validation images")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=30)
    F.add_batch_size(g, 64, "per process")
    g.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    g.add_argument("--min-lr", type=float, default=1e-5, help="final learning rate of the cosine schedule")
    g.add_argument("--weight-decay", type=float, default=0.05)
    F.add_warmup_epochs(g, 1.0)
    g.add_argument("--label-smoothing", type=float, default=0.1)
    F.add_clip_grad(g, 1.0)
    g.add_argument("--ema-decay", type=float, default=None, help="keep an EMA of the weights with this decay")
    F.add_precision(
        g,
        ("auto", "fp32", "bf16", "fp16"),
        "auto",
        aliases=("--amp",),
        help="mixed precision on CUDA (auto: bf16 if supported, else fp16 with a grad scaler)",
    )
    g = p.add_argument_group("run")
    F.add_output_dir(g, None, "output directory (default: runs/<model>)", aliases=("--output",))
    F.add_resume(g)
    F.add_overwrite(g)
    F.add_stop_after_epochs(
        g,
        "stop after N epochs of this invocation (for time-limited jobs); the schedule still spans "
        "--epochs and --resume continues",
    )
    g.add_argument("--seed", type=int, default=0)
    F.add_device(g, help="auto | cpu | cuda | cuda:N (torchrun: auto and cuda are cuda:LOCAL_RANK)")
    g.add_argument("--dist-backend", default=None, help="torch.distributed backend (default: nccl on GPU, gloo on CPU)")
    F.add_threads(g)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-plot", action="store_true", help="do not draw metrics.png")
    g.add_argument("--quiet", action="store_true", help="no per-epoch log lines")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from ..train import TrainConfig, train

    cfg = TrainConfig(
        model=args.model,
        model_args=F.parse_model_args(args.model_arg),
        data=args.data,
        output=args.output_dir or f"runs/{args.model}",
        img_size=args.image_size,
        in_chans=args.in_channels,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        label_smoothing=args.label_smoothing,
        clip_grad=args.clip_grad,
        ema_decay=args.ema_decay,
        amp="off" if args.precision == "fp32" else args.precision,
        workers=args.workers,
        seed=args.seed,
        device=args.device,
        dist_backend=args.dist_backend,
        resume=args.resume,
        overwrite=args.overwrite,
        stop_after_epochs=args.stop_after_epochs,
        train_limit=args.train_limit,
        val_limit=args.val_limit,
        hflip=args.hflip,
        crop_scale=args.crop_scale,
        crop_pct=args.crop_pct,
        mean=args.mean,
        std=args.std,
        progress=not args.no_progress,
        plot=not args.no_plot,
        verbose=not args.quiet,
    )
    train(cfg)
    return 0


def _add_eval(sub: Any) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a training checkpoint", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    F.add_checkpoint(p, "a last.pt / best.pt written by gspn train", aliases=("--ckpt",))
    p.add_argument("--data", default=None, help="override the checkpoint's data (digits or an ImageFolder root)")
    F.add_batch_size(p, 128, "images per batch")
    p.add_argument("--workers", type=int, default=2)
    F.add_ema(p, False, "evaluate the EMA weights")
    F.add_device(p)
    p.add_argument("--val-limit", type=int, default=None)
    F.add_threads(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_cmd_eval, _required=("checkpoint",))


def _cmd_eval(args: argparse.Namespace) -> int:
    from ..train import evaluate_checkpoint

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
    F.add_image_size(p, None, "input side (default: the model's, e.g. 224)", aliases=("--img-size",))
    F.add_in_channels(p, None, "input channels (default: the model's)", aliases=("--in-chans",))
    p.add_argument("--num-classes", type=int, default=None, help="classes (default: the model's)")
    F.add_batch_size(p, 1, "batch of the counted forward pass", aliases=("--batch",))
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    p.set_defaults(func=_cmd_flops)


def _cmd_flops(args: argparse.Namespace) -> int:
    import torch

    from ..models import create_model, get_default_cfg
    from ..models.complexity import complexity
    from ..train import available_models, build_model, model_task

    names = args.model or [n for n in available_models(task=None) if not n.startswith("baseline_")]
    for flag in ("image_size", "in_channels", "num_classes", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    if not args.json:
        print(f"{'model':<20} {'input':>14} {'params (M)':>12} {'GMACs':>10}")
    for name in names:
        task = model_task(name)
        cfg = {} if name.startswith("baseline_") else get_default_cfg(name)
        default_chans, default_size = cfg.get("input_size", (3, 224, 224))[:2]
        side = args.image_size or default_size
        size = (args.in_channels or default_chans, side, side)
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
            print(f"{name:<20} {shape:>14} {c['params'] / 1e6:>12.3f} {c['macs'] / 1e9:>10.3f}")
    return 0


def models_table(argv: Sequence[str] | None = None) -> None:
    """``python -m gspn.models [names] [--image-size H [W]]``: parameters and MACs of registered models
    next to the papers' reference numbers."""
    import torch

    from ..models import create_model, get_default_cfg, list_models
    from ..models.complexity import complexity

    parser = argparse.ArgumentParser(prog="python -m gspn.models", description=models_table.__doc__)
    parser.add_argument("models", nargs="*", help="model names (default: all registered)")
    F.add_image_size(parser, None, "H [W] (default: the model's)", aliases=("--img-size",), nargs="+")
    parser.add_argument("--num-classes", type=int, default=None)
    args = parser.parse_args(argv)
    print(f"{'model':<12} {'input':>9} {'params':>14} {'GMACs':>8} {'ref params':>12} {'ref GMACs':>10}")
    for name in args.models or list_models():
        cfg = get_default_cfg(name)
        overrides = {} if args.num_classes is None else {"num_classes": args.num_classes}
        with torch.device("meta"):
            model = create_model(name, **overrides)
        size = tuple(cfg["input_size"][1:]) if args.image_size is None else tuple(args.image_size * 2)[:2]
        res = complexity(model, (cfg["input_size"][0], *size))
        ref_p = f"{cfg['reference_params']:,}" if "reference_params" in cfg else "-"
        ref_m = f"{cfg['reference_gmacs']:.2f}" if "reference_gmacs" in cfg else "-"
        shape = f"{size[0]}x{size[1]}"
        print(f"{name:<12} {shape:>9} {res['params']:>14,} {res['gmacs']:>8.3f} {ref_p:>12} {ref_m:>10}")


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
    from ..models.reference_checkpoints import convert_checkpoint

    out = convert_checkpoint(args.src, args.out, args.model, entry=args.entry, **F.parse_model_args(args.model_arg))
    print(json.dumps({"output": str(out), "src": args.src, "model": args.model or "inferred"}))
    return 0
