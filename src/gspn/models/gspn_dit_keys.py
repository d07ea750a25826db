"""The authors' GSPN-DiT checkpoints (NVlabs/GSPN generator training) in the names of
:class:`~gspn.models.GSPNDiT`.

The reference layout: ``x_embedder.proj``, ``t_embedder.mlp.{0,2}``, ``y_embedder``, the blocks
``in_blocks.<i>`` / ``mid_block`` / ``out_blocks.<i>`` (their GSPN parameters directly in the block,
``conv2d`` the depthwise conv), ``norm_f``, ``final_layer``. Its ``args`` give the image size; the
latent is ``image_size / 8``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from ._reference_keys import GSPN_PARAMS, ReferenceKeyMap

__all__ = ["GENERATOR_KEYS"]

_BLOCK_INNER = {
    "norm": "norm",
    "in_proj": "in_proj",
    "conv2d": "conv",
    "out_conv": "out_conv",
    "out_dconv": "out_dwconv",
    "out_proj": "out_proj",
    "skip_linear": "skip_linear",
    **{p: f"gspn.{p}" for p in GSPN_PARAMS},
}
_FIXED = {
    "x_embedder.proj": "x_embedder",
    "t_embedder.mlp.0": "t_embedder.linear_1",
    "t_embedder.mlp.2": "t_embedder.linear_2",
    "y_embedder.embedding_table": "y_embedder.embedding_table",
    "norm_f": "norm_f",
    "final_layer.linear": "final_layer.linear",
    "final_layer.adaLN_modulation.1": "final_layer.adaLN_modulation.1",
}
_BLOCK = re.compile(r"(in_blocks\.\d+|mid_block|out_blocks\.\d+)\.(.+)\.(\w+)")
_REF_KEY = re.compile(r"x_embedder\.proj\.|(in_blocks\.\d+|mid_block|out_blocks\.\d+)\.(conv2d|x_conv_down)\.")


def _map_block(key: str) -> str | None:
    m = _BLOCK.fullmatch(key)
    if m and m[2] in _BLOCK_INNER:
        return f"{m[1]}.{_BLOCK_INNER[m[2]]}.{m[3]}"
    return None


def _recognises(keys: list[str]) -> bool:
    """The reference's names (ours, e.g. ``in_blocks.0.gspn.*`` or ``x_embedder.weight``, are not)."""
    return any(_REF_KEY.match(k) for k in keys)


def _infer_args(shape: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """``hidden_size, depth, patch_size, in_channels, d_state, kernel_size, num_classes, learn_sigma``."""
    out: dict[str, Any] = {}
    if "x_embedder.proj.weight" in shape:
        hidden, in_ch, p, _ = shape["x_embedder.proj.weight"]
        out.update(hidden_size=hidden, in_channels=in_ch, patch_size=p)
        if "final_layer.linear.weight" in shape:
            out["learn_sigma"] = shape["final_layer.linear.weight"][0] == p * p * 2 * in_ch
    n_in = len({m[1] for k in shape if (m := re.match(r"in_blocks\.(\d+)\.", k))})
    if n_in:
        out["depth"] = 2 * n_in
    if "mid_block.x_conv_down.weight" in shape:
        out["d_state"] = shape["mid_block.x_conv_down.weight"][0]
    if "mid_block.conv2d.weight" in shape:
        out["kernel_size"] = shape["mid_block.conv2d.weight"][-1]
    if "y_embedder.embedding_table.weight" in shape:
        out["num_classes"] = shape["y_embedder.embedding_table.weight"][0] - 1
    return out


def _file_defaults(value: Callable[[str], Any]) -> dict[str, Any]:
    """The latent size (``image_size / 8``) from the training arguments."""
    image_size = value("image_size")
    return {"input_size": image_size // 8} if isinstance(image_size, int) and image_size > 0 else {}


GENERATOR_KEYS = ReferenceKeyMap(
    kind="generator",
    default_entry="ema",
    reference_args={
        "norm_eps": 1e-5,
        "final_norm_eps": 1e-6,
        "merge_frame": "scan",
        "wiring": "hidden_residual",
        "num_global_blocks": 0,
    },
    suggest="gspn_dit_b_2 / _l_2 / _xl_2",
    fixed=_FIXED,
    map_block=_map_block,
    recognises=_recognises,
    infer_args=_infer_args,
    file_defaults=_file_defaults,
)
"""The reference generator family (training checkpoints with entries ``model``, ``ema``)."""
