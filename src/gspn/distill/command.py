"""The distillation run behind ``gspn distill`` (flags: :mod:`gspn.commands`).

Single process::

    HF_HUB_OFFLINE=1 gspn distill --model runwayml/stable-diffusion-v1-5 \\
        --captions captions.txt --output-dir runs/sd15-gspn --steps 10000

Multi-GPU (one process per GPU; either launcher works)::

    torchrun --standalone --nproc_per_node=8 -m gspn distill --model ... --captions ...
    accelerate launch --multi_gpu --num_processes 8 -m gspn distill --model ... --captions ...
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .trainer import DistillConfig

__all__ = ["config_from_args", "run_distill"]


def config_from_args(args: Any) -> DistillConfig:
    """The :class:`~gspn.distill.trainer.DistillConfig` of parsed arguments."""
    from .trainer import DistillConfig

    return DistillConfig(
        model=args.model, captions=args.captions, output_dir=args.output_dir, resolution=args.image_size,
        batch_size=args.batch_size, steps=args.steps, lr=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, lr_schedule=args.lr_schedule, max_grad_norm=args.clip_grad or 0.0,
        noise_weight=args.noise_weight, output_weight=args.output_weight,
        feature_weight=args.feature_weight, caption_dropout=args.caption_dropout, seed=args.seed,
        save_every=args.save_every, log_every=args.log_every, resume=not args.no_resume,
        overwrite=getattr(args, "overwrite", False),
        mixed_precision="bf16" if args.precision == "bf16" else "no",
        gradient_checkpointing=args.gradient_checkpointing,
        train_all=args.train_all, device=args.device,
        gspn={"d_state": args.d_state, "expand": args.expand, "kernel_size": args.kernel_size,
              "chunk_size": args.chunk_size, "gate_channels": args.gate_channels},
    )


def run_distill(args: Any) -> int:
    """Run ``gspn distill`` with parsed arguments; returns the exit status."""
    from .._files import check_output_dir
    from .._validate import check_int, check_number
    from ..integrations.diffusers import GSPNAdapter
    from ..train.distributed import cleanup_distributed
    from .trainer import Distiller

    for name in ("steps", "batch_size", "image_size", "log_every", "d_state"):
        check_int(name, getattr(args, name))
    for name in ("save_every", "warmup_steps", "kernel_size", "threads"):
        check_int(name, getattr(args, name, 0), minimum=0)
    check_number("lr", args.lr, 0, lo_open=True)
    check_number("clip_grad", args.clip_grad, 0, allow_none=True)
    for name in ("weight_decay", "noise_weight", "output_weight", "feature_weight"):
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
