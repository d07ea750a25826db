"""GSPN backbones, a timm-style registry, safetensors checkpoints and complexity counting.

>>> import gspn
>>> gspn.list_models()
['gspn_b', 'gspn_dit_b_2', 'gspn_dit_b_4', ..., 'gspn_nano', 'gspn_s', 'gspn_t']
>>> model = gspn.create_model("gspn_nano", num_classes=10)
"""

from . import gspn_dit, gspn_vision
from ._registry import create_model, get_default_cfg, is_model, list_models, model_entrypoint, register_model
from .checkpoint import load_checkpoint, load_model, read_metadata, save_checkpoint
from .complexity import complexity, count_params
from .gspn_dit import GSPNDiT
from .gspn_vision import GSPNClassifier, block_chunk_sizes, gspn_b, gspn_micro, gspn_nano, gspn_s, gspn_t

__all__ = [
    "GSPNClassifier",
    "GSPNDiT",
    "block_chunk_sizes",
    "complexity",
    "count_params",
    "create_model",
    "get_default_cfg",
    "gspn_b",
    "gspn_dit",
    "gspn_micro",
    "gspn_nano",
    "gspn_s",
    "gspn_t",
    "gspn_vision",
    "is_model",
    "list_models",
    "load_checkpoint",
    "load_model",
    "model_entrypoint",
    "read_metadata",
    "register_model",
    "save_checkpoint",
]
