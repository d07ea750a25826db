"""Encoder distillation (``gspn distill-encoder``): an attention encoder distilled into an isotropic GSPN
encoder in C-GSPN's two stages — per-layer supervision, then end-to-end alignment of the final features —
as a config and its maths on the kit's runner (:func:`gspn.training_utils.run`).

* :class:`EncoderDistillationConfig` + :func:`run` (:mod:`.train`, which documents the method, the
  teacher protocol and which choices are ours);
* :mod:`.protocol` — :func:`load_teacher` (a ``model.safetensors``, a run folder or a ``gspn train``
  training state), :func:`block_outputs`, :func:`layer_map`, :func:`nmse`, :func:`kd_loss`.

The flags are in :mod:`gspn.commands.distill_encoder`.
"""

from .protocol import block_outputs, kd_loss, layer_map, load_teacher, nmse
from .train import EncoderDistillationConfig, EncoderDistillationRecipe, check_config, run, upgrade_legacy_state

__all__ = [
    "EncoderDistillationConfig",
    "EncoderDistillationRecipe",
    "block_outputs",
    "check_config",
    "kd_loss",
    "layer_map",
    "load_teacher",
    "nmse",
    "run",
    "upgrade_legacy_state",
]
