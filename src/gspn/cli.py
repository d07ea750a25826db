"""The ``gspn`` command line: ``train``, ``eval``, ``flops``, ``bench``, ``train-dit``, ``sample``,
``extract-latents``, ``distill``, ``generate``, ``convert``.

Multi-GPU / multi-node training goes through ``torchrun``, e.g.::

    torchrun --standalone --nproc_per_node=8 -m gspn.cli train --model gspn_t --data /data/imagenet
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import NoReturn

__all__ = ["build_parser", "main"]


def _floats(n: int):
    def parse(s: str) -> tuple[float, ...]:
        vals = tuple(float(v) for v in s.replace(",", " ").split())
        if n and len(vals) != n:
            raise argparse.ArgumentTypeError(f"expected {n} comma-separated numbers, got {s!r}")
        return vals

    return parse


def _none_or_float(s: str) -> float | None:
    return None if s.lower() in ("none", "0", "off") else float(s)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a classifier",
        description="Train a classifier on the bundled digits or an ImageFolder directory. "
        "Launch with torchrun for DDP (one process per GPU; gloo on CPU).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--model", default="gspn_micro", help="registered model name or baseline_vit / baseline_conv"
    )
    g.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keyword override for the model constructor (repeatable; values are Python literals)",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default="digits",
        help="'digits' (scikit-learn's bundled 8x8 digits, upsampled) or an ImageFolder root "
        "with train/<class>/* and val/<class>/*",
    )
    g.add_argument(
        "--img-size", type=int, default=None, help="input size (default: 32 for digits, else the model's)"
    )
    g.add_argument("--in-chans", type=int, default=3, help="input channels (digits: any; folders: 1 or 3)")
    g.add_argument("--workers", type=int, default=2, help="DataLoader worker processes per training process")
    g.add_argument(
        "--hflip", type=float, default=None, help="horizontal flip probability (digits: 0, else 0.5)"
    )
    g.add_argument(
        "--crop-scale",
        type=_floats(2),
        default=None,
        metavar="LO,HI",
        help="random-resized-crop area range (digits: 0.7,1; else 0.08,1)",
    )
    g.add_argument(
        "--crop-pct", type=float, default=None, help="eval centre-crop fraction (digits: 1, else 0.875)"
    )
    g.add_argument("--mean", type=_floats(0), default=None, help="normalisation mean, comma-separated")
    g.add_argument("--std", type=_floats(0), default=None, help="normalisation std, comma-separated")
    g.add_argument("--train-limit", type=int, default=None, help="use only this many training images")
    g.add_argument("--val-limit", type=int, default=None, help="use only this many validation images")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=30)
    g.add_argument("--batch-size", type=int, default=64, help="per process")
    g.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    g.add_argument("--min-lr", type=float, default=1e-5, help="final learning rate of the cosine schedule")
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument(
        "--warmup-epochs", type=float, default=1.0, help="linear warm-up length (per-step schedule)"
    )
    g.add_argument("--label-smoothing", type=float, default=0.1)
    g.add_argument(
        "--clip-grad", type=_none_or_float, default=1.0, help="max gradient norm ('none' disables)"
    )
    g.add_argument("--ema-decay", type=float, default=None, help="keep an EMA of the weights with this decay")
    g.add_argument(
        "--amp",
        choices=["auto", "off", "bf16", "fp16"],
        default="auto",
        help="mixed precision on CUDA (auto: bf16 if supported, else fp16 with a grad scaler)",
    )
    g = p.add_argument_group("run")
    g.add_argument("--output", default=None, help="output directory (default: runs/<model>)")
    g.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="CHECKPOINT",
        help="resume from a checkpoint; without a path, from <output>/last.pt if it exists",
    )
    g.add_argument("--overwrite", action="store_true", help="replace the run already in the output directory")
    g.add_argument(
        "--stop-after-epochs",
        type=int,
        default=None,
        metavar="N",
        help="stop after N epochs of this invocation (for time-limited jobs); the schedule still spans "
        "--epochs and --resume continues",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--device", default="auto", help="auto | cpu | cuda | cuda:N (torchrun: auto and cuda are cuda:LOCAL_RANK)"
    )
    g.add_argument(
        "--dist-backend", default=None, help="torch.distributed backend (default: nccl on GPU, gloo on CPU)"
    )
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (0 = torch default)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-plot", action="store_true", help="do not draw metrics.png")
    g.add_argument("--quiet", action="store_true", help="no per-epoch log lines")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, parse_model_args, train

    cfg = TrainConfig(
        model=args.model,
        model_args=parse_model_args(args.model_arg),
        data=args.data,
        output=args.output or f"runs/{args.model}",
        img_size=args.img_size,
        in_chans=args.in_chans,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        label_smoothing=args.label_smoothing,
        clip_grad=args.clip_grad,
        ema_decay=args.ema_decay,
        amp=args.amp,
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


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a training checkpoint", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="a last.pt / best.pt written by gspn train")
    p.add_argument(
        "--data", default=None, help="override the checkpoint's data (digits or an ImageFolder root)"
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    p.add_argument("--device", default="auto")
    p.add_argument("--val-limit", type=int, default=None)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from .train import evaluate_checkpoint

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


def _add_flops(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "flops",
        help="print parameters and MACs per model",
        description="Parameters and multiply-accumulates of one forward pass (the GSPN papers' convention: "
        "convolutions, linears and matmuls, plus the line scans). Classifiers and diffusion models; each "
        "model at its own default input unless --img-size / --in-chans are given.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", nargs="+", default=None, help="model names (default: every registered model)")
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the model's, e.g. 224)")
    p.add_argument("--in-chans", type=int, default=None, help="input channels (default: the model's)")
    p.add_argument("--num-classes", type=int, default=None, help="classes (default: the model's)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    p.set_defaults(func=_cmd_flops)


def _cmd_flops(args: argparse.Namespace) -> int:
    import torch

    from .models import create_model, get_default_cfg
    from .models.complexity import complexity
    from .train import available_models, build_model, model_task

    names = args.model or [n for n in available_models(task=None) if not n.startswith("baseline_")]
    for flag in ("img_size", "in_chans", "num_classes", "batch"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    if not args.json:
        print(f"{'model':<20} {'input':>14} {'params (M)':>12} {'GMACs':>10}")
    for name in names:
        task = model_task(name)
        cfg = {} if name.startswith("baseline_") else get_default_cfg(name)
        default_chans, default_size = cfg.get("input_size", (3, 224, 224))[:2]
        size = (args.in_chans or default_chans, args.img_size or default_size, args.img_size or default_size)
        num_classes = args.num_classes or cfg.get("num_classes", 1000)
        with torch.device("meta"):  # shapes only: no memory, no compute
            if task == "diffusion":
                model = create_model(name, in_channels=size[0], input_size=size[1], num_classes=num_classes)
            else:
                model = build_model(name, num_classes=num_classes, in_chans=size[0])
        c = complexity(model, input_size=size, batch=args.batch)
        if args.json:
            record = {"model": name, "task": task, "input_size": list(size), "batch": args.batch,
                      "params": int(c["params"]), "macs": int(c["macs"])}
            print(json.dumps(record))
        else:
            shape = f"{args.batch}x{size[0]}x{size[1]}x{size[2]}"
            print(f"{name:<20} {shape:>14} {c['params'] / 1e6:>12.3f} {c['macs'] / 1e9:>10.3f}")
    return 0


def _add_convert(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--model", default=None,
                   help="registered model, e.g. gspn_t or gspn_dit_xl_2 (default: inferred from the tensor shapes)")
    p.add_argument("--entry", default=None,
                   help="state dict to convert: classifier 'model' (default) or 'model_ema'; "
                   "generator 'ema' (default) or 'model'")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="constructor override for other reference configurations (repeatable; Python literals)")
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    from .models.reference_checkpoints import convert_checkpoint
    from .train import parse_model_args

    out = convert_checkpoint(args.src, args.out, args.model, entry=args.entry, **parse_model_args(args.model_arg))
    print(json.dumps({"output": str(out), "src": args.src, "model": args.model or "inferred"}))
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from . import bench

    bench.add_arguments(sub.add_parser("bench", help=bench.HELP, description=bench.HELP))


def _add_diffusion(sub: argparse._SubParsersAction) -> None:
    """``train-dit``, ``sample``, ``extract-latents`` (:mod:`gspn.diffusion`): each run function
    returns a summary dict, printed as JSON."""
    from .diffusion.latents import add_extract_latents_arguments, run_extract_latents
    from .diffusion.sample import add_sample_arguments, run_sample
    from .diffusion.train import add_train_arguments, run_train

    commands = [
        ("train-dit", add_train_arguments, run_train,
         "train a class-conditional GSPN-DiT (digits, ImageFolder or latents)"),
        ("sample", add_sample_arguments, run_sample, "sample images from a GSPN-DiT checkpoint"),
        ("extract-latents", add_extract_latents_arguments, run_extract_latents,
         "encode a dataset with a diffusers AutoencoderKL"),
    ]
    for name, add, run, help_ in commands:
        p = sub.add_parser(name, help=help_, description=help_)
        add(p)
        p.set_defaults(func=lambda args, run=run: _print_summary(run(args)))


def _print_summary(result: dict | None) -> int:
    if result:
        print(json.dumps({k: v for k, v in result.items() if k != "labels"}, default=str))
    return 0


def _add_diffusers(sub: argparse._SubParsersAction) -> None:
    from .distill.command import add_distill_arguments, run_distill
    from .integrations.generate import add_generate_arguments, run_generate

    p = sub.add_parser("distill", help="distil a GSPN-swapped diffusion UNet from the original",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_distill_arguments(p)
    p.set_defaults(func=run_distill)
    p = sub.add_parser("generate", help="high-resolution text-to-image with a GSPN adapter",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_generate_arguments(p)
    p.set_defaults(func=run_generate)


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (``gspn train: error: ...``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


#: Optional modules and the extra of ``pyproject.toml`` that installs each.
_EXTRAS = {"sklearn": "data", "PIL": "data", "matplotlib": "plot", "diffusers": "diffusers",
           "transformers": "diffusers", "accelerate": "diffusers", "huggingface_hub": "hub", "triton": "triton",
           "tqdm": "data"}


def build_parser() -> argparse.ArgumentParser:
    """The ``gspn`` argument parser."""
    from . import __version__

    parser = _Parser(prog="gspn", description="Generalized Spatial Propagation Networks")
    parser.add_argument("--version", action="version", version=f"gspn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_eval(sub)
    _add_flops(sub)
    _add_convert(sub)
    _add_bench(sub)
    _add_diffusion(sub)
    _add_diffusers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gspn`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
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
        print(f"gspn {args.command}: error: this needs the optional package {top!r}: "
              f"pip install 'gspn[{_EXTRAS[top]}]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gspn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
