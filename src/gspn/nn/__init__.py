"""GSPN layers: the module, the token mixers, the classification block, small helpers and the attention
baselines GSPN is compared with.

Only :mod:`gspn.ops` and torch are imported here.
"""

from .attention import LinearAttention, MultiHeadSelfAttention, linear_attention
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
    "LinearAttention",
    "Mlp",
    "MultiHeadSelfAttention",
    "drop_path",
    "linear_attention",
    "resolve_hw",
]
