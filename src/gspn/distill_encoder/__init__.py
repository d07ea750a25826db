"""Distillation of an attention encoder into an isotropic GSPN encoder (``gspn distill-encoder``),
C-GSPN's two stages: per-layer supervision, then end-to-end alignment of the final features.

:class:`EncoderDistillConfig` + :func:`run` (in :mod:`gspn.distill_encoder.trainer`, which documents
the method, the teacher protocol and which choices are ours); the flags are in
:mod:`gspn.commands.distill_encoder`. Built on the training kit :mod:`gspn.training_utils`.
"""

from __future__ import annotations

from .trainer import RUN_FILES, EncoderDistillConfig, block_outputs, layer_map, load_teacher, nmse, run, validate

__all__ = ["RUN_FILES", "EncoderDistillConfig", "block_outputs", "layer_map", "load_teacher", "nmse", "run", "validate"]
