"""GSPN backbones, a timm-style registry, safetensors checkpoints and complexity counting.

>>> import gspn
>>> gspn.list_models()
['gspn_b', 'gspn_dit_b_2', 'gspn_dit_b_4', ..., 'gspn_nano', 'gspn_s', 'gspn_t']
>>> model = gspn.create_model("gspn_nano", num_classes=10)
>>> # the authors' GSPN-T, computing what their code computes (needs huggingface_hub):
>>> # model = gspn.create_model("gspn_t", pretrained=True)
"""

from . import baselines, gspn_dit, gspn_vision, gspn_vit, reference_checkpoints, vit
from ._features import FeatureInfo, FeatureListNet
from ._registry import create_model, get_default_cfg, is_model, list_models, model_entrypoint, register_model
from .checkpoint import load_checkpoint, load_model, read_metadata, save_checkpoint
from .complexity import complexity, count_params
from .convert import convert_checkpoint
from .gspn_dit import GSPNDiT
from .gspn_vision import GSPNClassifier, block_chunk_sizes, gspn_b, gspn_micro, gspn_nano, gspn_s, gspn_t
from .gspn_vit import GSPNViT
from .reference_checkpoints import reference_model_args
from .vit import VisionTransformer

__all__ = [
    "FeatureInfo",
    "FeatureListNet",
    "GSPNClassifier",
    "GSPNDiT",
    "GSPNViT",
    "VisionTransformer",
    "baselines",
    "block_chunk_sizes",
    "complexity",
    "convert_checkpoint",
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
    "gspn_vit",
    "is_model",
    "list_models",
    "load_checkpoint",
    "load_model",
    "model_entrypoint",
    "read_metadata",
    "reference_checkpoints",
    "reference_model_args",
    "register_model",
    "save_checkpoint",
    "vit",
]
