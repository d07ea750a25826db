"""Evidence run of ``gspn distill-encoder`` on CPU: attention teacher → distilled GSPN student vs the same
student trained from scratch, then the student's speed advantage as the resolution grows.

1. **Teacher**: ``vit_nano`` (attention, D=64, depth 4, patch 4) trained on the bundled digits with the
   classification recipe (``gspn train``'s defaults: AdamW, warm-up + cosine, label smoothing 0.1).
2. **Distilled**: ``gspn_vit_nano`` (the same depth/width/patch, GSPN blocks) distilled from it with
   ``gspn distill-encoder``, stage 1 per-layer supervision, then stage 2 in three variants: final
   features only (``distilled-features``: no labels, the teacher's head), the default final features +
   logit KD + labels (``distilled``), and the default with stage 1 block by block on the teacher's
   inputs (``distilled-blockwise``).
3. **Scratch**: ``gspn_vit_nano`` trained with the classification recipe for the same number of epochs
   (same data, batch, LR, schedule shape).

Accuracy is the validation accuracy of the final weights (and the best epoch's), and each student's
agreement with the teacher the fraction of validation images it classifies as the teacher does;
train time is the training time of each run (the distilled student's includes its teacher's forwards;
the teacher's own training is reported on its own row). Then, in one process with ``torch.set_num_threads(1)``, the
forward time (eval, no grad, batch ``--speed-batch``) of teacher and student at growing square
resolutions, timed round-robin (teacher, student, teacher, ...) and reduced to medians, with the ratio.

Usage::

    python benchmarks/distill_encoder.py                                   # ~20 min on one CPU thread
    python benchmarks/distill_encoder.py --teacher-epochs 2 --epochs 2 --resolutions 32 64   # smoke

Writes ``--output`` (default ``benchmarks/results/distill_encoder_cpu.json``) and prints two tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gspn.models import create_model
from gspn.recipes.classification import ClassificationConfig
from gspn.recipes.classification import run as train
from gspn.recipes.encoder_distillation import EncoderDistillationConfig
from gspn.recipes.encoder_distillation import run as distill
from gspn.training_utils import read_metrics

#: The distilled runs: C-GSPN's stage 2 read literally (align the final features only; the student
#: classifies with the teacher's head, copied at the start), and the recipe's default stage 2 (final
#: features + logit KD + label cross-entropy, head trained).
#: ``distilled-blockwise`` is the default with stage 1 run block by block on the teacher's inputs.
VARIANTS: dict[str, dict[str, Any]] = {
    "distilled-features": {"kd_weight": 0.0, "label_weight": 0.0},
    "distilled": {},
    "distilled-blockwise": {"stage1_inputs": "teacher"},
}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _row(name: str, kind: str, run_dir: Path, wall: float, summary: dict[str, Any]) -> dict[str, Any]:
    recs = read_metrics(run_dir / "metrics.jsonl")
    scored = [r for r in recs if r.get("stage", 2) == 2]
    best = max(scored, key=lambda r: (r["val_acc"], -r["epoch"]))
    return {
        "run": kind,
        "model": name,
        "params": summary["params"],
        "epochs": len(recs),
        "wall_s": wall,
        "train_s": recs[-1]["elapsed_s"],
        "final_val_acc": recs[-1]["val_acc"],
        "best_val_acc": best["val_acc"],
        "best_epoch": best["epoch"] + 1,
    }


def _agreement(rows: list[dict[str, Any]], work: Path) -> None:
    """Add to each student row the fraction of validation images it classifies as the teacher does, and
    how many of the teacher's mistakes it repeats (the same wrong label)."""
    from gspn.datasets import build_data
    from gspn.models import load_model, read_metadata

    path = work / "teacher" / "model.safetensors"
    meta = {
        k.removeprefix("gspn.train."): json.loads(v)
        for k, v in read_metadata(path).items()
        if k.startswith("gspn.train.")
    }
    data = build_data("digits", meta["img_size"], meta["in_chans"], meta["mean"], meta["std"])
    x = torch.stack([data.val[i][0] for i in range(len(data.val))])
    y = torch.tensor([data.val[i][1] for i in range(len(data.val))])
    with torch.no_grad():
        ref = load_model(path).eval()(x).argmax(-1)
        wrong = ref != y
        for r in rows:
            if r["run"] == "teacher":
                r["val_errors"] = int(wrong.sum())
            else:
                pred = load_model(work / r["run"] / "model.safetensors").eval()(x).argmax(-1)
                r["val_errors"] = int((pred != y).sum())
                r["agreement_with_teacher"] = (pred == ref).float().mean().item()
                r["repeats_teacher_errors"] = int((pred[wrong] == ref[wrong]).sum())


def _speed(
    teacher: str, student: str, resolutions: list[int], batch: int, reps: int, budget_s: float
) -> list[dict[str, Any]]:
    """Median forward times, round-robin over the two models at each resolution."""
    models = {name: create_model(name, num_classes=10, in_chans=1).eval() for name in (teacher, student)}
    rows = []
    for side in resolutions:
        x = torch.randn(batch, 1, side, side)
        times: dict[str, list[float]] = {name: [] for name in models}
        with torch.no_grad():
            for m in models.values():  # warm-up
                m(x)
            t_start = time.perf_counter()
            for _ in range(reps):
                for name, m in models.items():
                    t0 = time.perf_counter()
                    m(x)
                    times[name].append(time.perf_counter() - t0)
                if time.perf_counter() - t_start > budget_s and len(times[teacher]) >= 3:
                    break
        med = {name: statistics.median(v) for name, v in times.items()}
        row = {
            "side": side,
            "tokens": (side // models[teacher].patch_size) ** 2,
            "batch": batch,
            "reps": len(times[teacher]),
            f"{teacher}_ms": 1e3 * med[teacher],
            f"{student}_ms": 1e3 * med[student],
            "ratio": med[teacher] / med[student],
        }
        rows.append(row)
        print(
            f"{side:>5}² {row['tokens']:>6} tokens  {teacher} {row[f'{teacher}_ms']:9.2f} ms  "
            f"{student} {row[f'{student}_ms']:9.2f} ms  ratio {row['ratio']:.2f}×  ({row['reps']} reps)",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="vit_nano")
    p.add_argument("--student", default="gspn_vit_nano")
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument("--epochs", type=int, default=10, help="epochs of the distilled and of the scratch student")
    p.add_argument("--stage1-epochs", type=int, default=3)
    p.add_argument("--stage1-inputs", default="student", choices=("student", "teacher"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resolutions", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    p.add_argument("--speed-batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--speed-budget-s", type=float, default=60.0, help="per resolution, after which fewer reps")
    p.add_argument("--work-dir", default="bench_out/distill_encoder")
    p.add_argument("--output", default="benchmarks/results/distill_encoder_cpu.json")
    p.add_argument("--skip-training", action="store_true", help="only the speed table")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    common = dict(
        data="digits",
        image_size=args.image_size,
        in_channels=1,
        batch_size=args.batch_size,
        lr=args.lr,
        workers=0,
        seed=args.seed,
        device="cpu",
        progress=False,
        plot=False,
        overwrite=True,
    )
    rows: list[dict[str, Any]] = []
    if not args.skip_training:
        print(f"=== teacher {args.teacher} ({args.teacher_epochs} epochs) ===", flush=True)
        t0 = time.perf_counter()
        s = train(
            ClassificationConfig(
                model=args.teacher, output_dir=str(work / "teacher"), epochs=args.teacher_epochs, **common
            )
        )
        rows.append(_row(args.teacher, "teacher", work / "teacher", time.perf_counter() - t0, s))

        for kind, weights in VARIANTS.items():
            print(
                f"=== {kind} {args.student} ({args.stage1_epochs} + {args.epochs - args.stage1_epochs} epochs) ===",
                flush=True,
            )
            t0 = time.perf_counter()
            s = distill(
                EncoderDistillationConfig(
                    teacher=str(work / "teacher" / "model.safetensors"),
                    model=args.student,
                    output_dir=str(work / kind),
                    epochs=args.epochs,
                    stage1_epochs=args.stage1_epochs,
                    batch_size=args.batch_size,
                    lr=args.lr,
                    workers=0,
                    seed=args.seed,
                    device="cpu",
                    progress=False,
                    plot=False,
                    overwrite=True,
                    **{"stage1_inputs": args.stage1_inputs, **weights},
                )
            )
            rows.append(_row(args.student, kind, work / kind, time.perf_counter() - t0, s))

        print(f"=== scratch {args.student} ({args.epochs} epochs) ===", flush=True)
        t0 = time.perf_counter()
        s = train(
            ClassificationConfig(model=args.student, output_dir=str(work / "scratch"), epochs=args.epochs, **common)
        )
        rows.append(_row(args.student, "scratch", work / "scratch", time.perf_counter() - t0, s))

    if rows:
        _agreement(rows, work)

    print(f"\n=== forward time, {args.threads} thread(s), batch {args.speed_batch}, round-robin ===", flush=True)
    speed = _speed(args.teacher, args.student, args.resolutions, args.speed_batch, args.reps, args.speed_budget_s)

    env = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(sys.argv),
    }
    settings = {
        k: getattr(args, k)
        for k in (
            "teacher",
            "student",
            "teacher_epochs",
            "epochs",
            "stage1_epochs",
            "stage1_inputs",
            "batch_size",
            "lr",
            "image_size",
            "seed",
        )
    }
    settings["data"] = "sklearn digits (8x8 upsampled), fixed stratified 80/20 split (1438 train / 359 val), 1 channel"
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "settings": settings, "training": rows, "speed": speed}, indent=2) + "\n")

    if rows:
        print(
            f"\n{'run':<19} {'model':<15} {'params':>8} {'epochs':>6} {'train s':>8} {'final val':>9} "
            f"{'best val':>9} {'= teacher':>9} {'errors (same as teacher)':>24}"
        )
        for r in rows:
            agree = f"{100 * r['agreement_with_teacher']:>8.2f}%" if "agreement_with_teacher" in r else f"{'':>9}"
            same = f" ({r['repeats_teacher_errors']:>3})" if "repeats_teacher_errors" in r else " " * 6
            errors = f"{r.get('val_errors', ''):>18}{same}"
            print(
                f"{r['run']:<19} {r['model']:<15} {r['params']:>8} {r['epochs']:>6} {r['train_s']:>8.1f} "
                f"{100 * r['final_val_acc']:>8.2f}% {100 * r['best_val_acc']:>8.2f}% {agree} {errors}"
            )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
