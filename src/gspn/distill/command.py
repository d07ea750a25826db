"""Deprecated module: the distillation recipe's entry point is :func:`gspn.distill.trainer.run` of a
:class:`~gspn.distill.trainer.DistillConfig`; ``gspn distill`` builds the config from its flags
(:func:`gspn.commands.diffusers.distill_config`).

Single process::

    HF_HUB_OFFLINE=1 gspn distill --model runwayml/stable-diffusion-v1-5 \\
        --captions captions.txt --output-dir runs/sd15-gspn --steps 10000

Multi-GPU (one process per GPU; either launcher works)::

    torchrun --standalone --nproc_per_node=8 -m gspn distill --model ... --captions ...
    accelerate launch --multi_gpu --num_processes 8 -m gspn distill --model ... --captions ...
"""

from __future__ import annotations

from .trainer import run as run_distill

__all__ = ["run_distill"]
