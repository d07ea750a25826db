"""Evidence benchmark: GSPN vs same-size attention and convolutional baselines on the bundled digits.

Trains, in one run and with one recipe (``gspn.recipes.classification`` defaults unless overridden: AdamW, cosine with
warm-up, label smoothing 0.1, gradient clipping 1.0), on scikit-learn's digits upsampled to 32×32:

* ``gspn_micro`` (or ``--gspn-model NAME``), from the ``gspn.models`` registry;
* ``baseline_vit`` — a ViT-style model (patch 4, depth 4), width chosen to match the GSPN model's
  parameter count;
* ``baseline_conv`` — a small ResNet, width chosen the same way.

Prints a table (parameters, epochs, wall and CPU time, best validation accuracy and when it was reached)
and writes ``<out>/results.json``; each model's run directory (checkpoints, ``metrics.jsonl``,
``metrics.png``) is under ``<out>/<model>``. Data loading runs in the training process
(``--workers 0``) so that the CPU time reported is the whole cost of training.

Usage::

    python benchmarks/train_digits.py                       # needs gspn_micro from gspn.models
    python benchmarks/train_digits.py --gspn-model NAME     # any registered model
    python benchmarks/train_digits.py --epochs 5 --threads 2

Until the ``gspn.models`` backbones are installed, the default ``gspn_micro`` is missing and the script
stops with a message saying so; ``--gspn-model`` with another registered name runs everything else.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gspn._validate import parse_model_args
from gspn.models.baselines import count_params, match_params
from gspn.recipes.classification import ClassificationConfig, build_model
from gspn.recipes.classification import run as train
from gspn.training_utils import read_metrics


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _macs(model: torch.nn.Module, size: int) -> int | None:
    try:
        from gspn.models.complexity import complexity
    except ImportError:
        return None
    try:
        return int(complexity(model, input_size=(3, size, size), batch=1)["macs"])
    except Exception as e:  # a counting failure must not lose the training results
        print(f"warning: MAC count failed for {type(model).__name__}: {e}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gspn-model", default="gspn_micro", help="registered GSPN model to benchmark")
    p.add_argument(
        "--gspn-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="constructor override for the GSPN model (repeatable)",
    )
    p.add_argument("--only", nargs="+", choices=["gspn", "vit", "conv"], default=["gspn", "vit", "conv"])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (0: torch's default). One thread makes the CPU time a property of the "
        "model rather than of OpenMP scheduling on a busy machine",
    )
    p.add_argument("--vit-depth", type=int, default=4)
    p.add_argument("--vit-patch", type=int, default=4)
    p.add_argument("--conv-depths", default="1,1,1", help="basic blocks per stage of the conv baseline")
    p.add_argument("--train-limit", type=int, default=None, help="fewer training images (smoke tests only)")
    p.add_argument("--output-dir", default="bench_out/train_digits")
    p.add_argument("--progress", action="store_true", help="show per-epoch progress bars")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        gspn_args = parse_model_args(args.gspn_arg)
        ref = build_model(args.gspn_model, num_classes=10, in_chans=3, **gspn_args)
    except Exception as e:  # whatever the registry raises for an unknown name
        print(
            f"error: cannot build {args.gspn_model!r} ({e}).\n"
            "gspn_micro comes with the gspn.models backbones; until they are installed, pass "
            "--gspn-model with a registered model name (see gspn.models.list_models()).",
            file=sys.stderr,
        )
        return 2
    target = count_params(ref)
    conv_depths = tuple(int(d) for d in args.conv_depths.split(","))
    candidates: dict[str, tuple[str, dict[str, Any]]] = {
        "gspn": (args.gspn_model, gspn_args),
        "vit": (
            "baseline_vit",
            match_params("baseline_vit", target, depth=args.vit_depth, patch_size=args.vit_patch),
        ),
        "conv": ("baseline_conv", match_params("baseline_conv", target, depths=conv_depths)),
    }
    out = Path(args.output_dir)
    rows: list[dict[str, Any]] = []
    for key in args.only:
        name, model_args = candidates[key]
        run_dir = out / name
        print(f"\n=== {name} {model_args or ''} ===", flush=True)
        cfg = ClassificationConfig(
            model=name,
            model_args=model_args,
            data="digits",
            output_dir=str(run_dir),
            image_size=args.image_size,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            warmup_epochs=args.warmup_epochs,
            workers=0,
            train_limit=args.train_limit,
            seed=args.seed,
            device="cpu",
            progress=args.progress,
            overwrite=True,  # a fresh run every time: stale checkpoints must not be resumed into a benchmark
        )
        t0 = time.perf_counter()
        s = train(cfg)
        wall = time.perf_counter() - t0
        recs = read_metrics(run_dir / "metrics.jsonl")
        best = max(recs, key=lambda r: (r["val_acc"], -r["epoch"]))
        model = build_model(name, num_classes=10, in_chans=3, **model_args)
        rows.append(
            {
                "model": name,
                "model_args": model_args,
                "params": s["params"],
                "macs": _macs(model, args.image_size),
                "epochs": args.epochs,
                "wall_s": wall,
                "train_wall_s": s["elapsed_s"],
                "cpu_s": s["cpu_s"],
                "best_val_acc": best["val_acc"],
                "best_epoch": best["epoch"] + 1,
                "wall_s_to_best": best["elapsed_s"],
                "cpu_s_to_best": best["cpu_s"],
                "final_val_acc": recs[-1]["val_acc"],
                "train_imgs_per_s": sum(r["train_imgs_per_s"] for r in recs) / len(recs),
            }
        )

    env = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    settings = ("epochs", "image_size", "batch_size", "lr", "weight_decay", "warmup_epochs", "seed")
    recipe = {k: getattr(args, k) for k in settings}
    recipe.update(
        label_smoothing=0.1,
        clip_grad=1.0,
        data="sklearn digits, fixed stratified 80/20 split (1438 train / 359 val)",
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"env": env, "recipe": recipe, "results": rows}, indent=2))

    print(f"\ndigits {args.image_size}x{args.image_size}, {args.epochs} epochs, {env['threads']} threads, {env['cpu']}")
    hdr = (
        f"{'model':<16} {'params':>9} {'MMACs':>8} {'wall s':>8} {'CPU s':>8} {'best val':>9} "
        f"{'@epoch':>7} {'CPU s→best':>11} {'final val':>10}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        macs = f"{r['macs'] / 1e6:.1f}" if r["macs"] is not None else "-"
        print(
            f"{r['model']:<16} {r['params']:>9,} {macs:>8} {r['train_wall_s']:>8.1f} {r['cpu_s']:>8.1f} "
            f"{100 * r['best_val_acc']:>8.2f}% {r['best_epoch']:>7} {r['cpu_s_to_best']:>11.1f} "
            f"{100 * r['final_val_acc']:>9.2f}%"
        )
    print(f"\nresults: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
