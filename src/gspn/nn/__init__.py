"""GSPN layers: the module, the token mixers, the classification block and small helpers.

Only :mod:`gspn.ops` and torch are imported here.
"""

from .block import GSPNBlock
from .gspn2d import GSPN2d
from .layers import GRN, DropPath, LayerNorm2d, Mlp, drop_path
from .mixer import GSPNAttention, GSPNMixer, resolve_hw

__all__ = [
    "GRN",
    "DropPath",
    "GSPN2d",
    "GSPNAttention",
    "GSPNBlock",
    "GSPNMixer",
    "LayerNorm2d",
    "Mlp",
    "drop_path",
    "resolve_hw",
]
