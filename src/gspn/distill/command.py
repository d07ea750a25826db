"""Command-line front end of the distillation trainer (``gspn distill`` / ``python -m gspn.distill``).

Single process::

    HF_HUB_OFFLINE=1 python -m gspn.distill --model runwayml/stable-diffusion-v1-5 \\
        --captions captions.txt --output-dir runs/sd15-gspn --steps 10000

Multi-GPU (one process per GPU; either launcher works)::

    torchrun --standalone --nproc_per_node=8 -m gspn.distill --model ... --captions ...
    accelerate launch --multi_gpu --num_processes 8 -m gspn.distill --model ... --captions ...
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .trainer import DistillConfig

__all__ = ["add_distill_arguments", "config_from_args", "main", "run_distill"]


def _optional_int(s: str) -> int | None:
    return None if s.lower() in ("none", "global", "0") else int(s)


def add_distill_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``gspn distill`` options to ``parser``; returns it."""
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", required=True,
                   help="diffusers pipeline folder or hub name (resolved from the local HF cache; "
                        "HF_HUB_OFFLINE=1 forbids downloads)")
    g.add_argument("--captions", required=True,
                   help="caption file (one per line) or image-caption folder (<img> + <img>.txt, "
                        "or metadata.jsonl with file_name/text)")
    g.add_argument("--output-dir", default="gspn-distill", help="checkpoint.pt and adapter/ go here")
    g.add_argument("--init-adapter", default=None, help="start from this saved GSPN adapter")
    g.add_argument("--resolution", type=int, default=512, help="training resolution in pixels (square)")
    g.add_argument("--caption-dropout", type=float, default=0.0,
                   help="probability of an empty caption (keeps classifier-free guidance working)")
    g = parser.add_argument_group("GSPN layers")
    g.add_argument("--d-state", type=int, default=8, help="GSPN proxy dimension")
    g.add_argument("--expand", type=float, default=1.0, help="GSPN inner width / layer width")
    g.add_argument("--kernel-size", type=int, default=3, help="depthwise conv before the scan (0: none)")
    g.add_argument("--chunk-size", type=_optional_int, default=None,
                   help="local GSPN tile size in lines (the paper uses 4); 'none' = global")
    g.add_argument("--gate-channels", type=_optional_int, default=None, help="shared gate channels")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=1000, help="total optimisation steps")
    g.add_argument("--batch-size", type=int, default=1, help="per process")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--noise-weight", type=float, default=1.0, help="weight of MSE(student, ε/v target)")
    g.add_argument("--output-weight", type=float, default=0.5, help="weight of MSE(student, teacher)")
    g.add_argument("--feature-weight", type=float, default=0.5,
                   help="weight of the mean per-layer MSE of the swapped layers' outputs (0: no hooks)")
    g.add_argument("--mixed-precision", choices=("no", "bf16"), default="no")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--train-all", action="store_true",
                   help="train the whole UNet (the teacher is then a frozen copy)")
    g = parser.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--save-every", type=int, default=500, help="checkpoint period in steps")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--no-resume", action="store_true",
                   help="do not continue the run in --output-dir (refused if one is there, unless --overwrite)")
    g.add_argument("--overwrite", action="store_true", help="with --no-resume: replace the run in --output-dir")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    g.add_argument("--device", default=None, help="default: cuda (LOCAL_RANK) if available, else cpu")
    return parser


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    """The :class:`~gspn.distill.trainer.DistillConfig` of parsed arguments."""
    from .trainer import DistillConfig

    return DistillConfig(
        model=args.model, captions=args.captions, output_dir=args.output_dir, resolution=args.resolution,
        batch_size=args.batch_size, steps=args.steps, lr=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, lr_schedule=args.lr_schedule, max_grad_norm=args.max_grad_norm,
        noise_weight=args.noise_weight, output_weight=args.output_weight,
        feature_weight=args.feature_weight, caption_dropout=args.caption_dropout, seed=args.seed,
        save_every=args.save_every, log_every=args.log_every, resume=not args.no_resume,
        overwrite=getattr(args, "overwrite", False),
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
        train_all=args.train_all, device=args.device,
        gspn={"d_state": args.d_state, "expand": args.expand, "kernel_size": args.kernel_size,
              "chunk_size": args.chunk_size, "gate_channels": args.gate_channels},
    )


def run_distill(args: argparse.Namespace) -> int:
    """Run ``gspn distill`` with parsed arguments; returns the exit status."""
    from .._files import check_output_dir
    from .._validate import check_int, check_number
    from ..integrations.diffusers import GSPNAdapter
    from ..train.distributed import cleanup_distributed
    from .trainer import Distiller

    for name in ("steps", "batch_size", "resolution", "log_every", "d_state"):
        check_int(name, getattr(args, name))
    for name in ("save_every", "warmup_steps", "kernel_size", "threads"):
        check_int(name, getattr(args, name, 0), minimum=0)
    check_number("lr", args.lr, 0, lo_open=True)
    for name in ("weight_decay", "max_grad_norm", "noise_weight", "output_weight", "feature_weight"):
        check_number(name, getattr(args, name), 0)
    check_number("caption_dropout", args.caption_dropout, 0, 1)
    check_output_dir(args.output_dir)
    if getattr(args, "threads", 0):
        import torch

        torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    adapter = GSPNAdapter.from_pretrained(args.init_adapter) if args.init_adapter else None
    ok = False
    try:
        distiller = Distiller(cfg, adapter=adapter)
        history = distiller.train()
        if distiller.rank == 0:
            last = history[-1] if history else {}
            print(json.dumps({"step": distiller.step, "adapter": str(distiller.output_dir / "adapter"), **last}))
        ok = True
    finally:
        cleanup_distributed(ok)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m gspn.distill``."""
    parser = argparse.ArgumentParser(
        prog="gspn distill", description="Distil a GSPN-swapped diffusion UNet from the original.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_distill_arguments(parser)
    return run_distill(parser.parse_args(argv))
