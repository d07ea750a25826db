"""The authors' GSPN classifier checkpoints (NVlabs/GSPN ``classification``) in the names of
:class:`~gspn.models.GSPNClassifier`.

The reference publishes GSPN-T/S/B on the Hugging Face Hub (:data:`HF_HUB_ID`; the files are named
by each model's ``default_cfg["hf_hub_filename"]``). Its layout: ``patch_embed.{0,2,5,7}`` (the
stem), ``layers.<i>.blocks.<j>.*`` (the blocks; ``op.*`` the mixer), ``layers.<i>.downsample.*``
(ending layer ``i``: ours starts stage ``i + 1``), ``classifier.{norm,head}``. Its "global" blocks
scan tiles of the configured feature size (``global_chunk_sizes``, from the file's ``FEAT_SIZE`` or
``IMG_SIZE``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from ._reference_keys import GSPN_PARAMS, ReferenceKeyMap

__all__ = ["CLASSIFIER_KEYS", "HF_HUB_ID"]

HF_HUB_ID = "whj363636/GSPN"
"""The Hugging Face Hub repository of the authors' ImageNet-1K classifiers."""

_BLOCK_INNER = {
    "norm": "norm1",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "op.in_proj": "mixer.in_proj",
    "op.conv2d": "mixer.conv",
    "op.grn": "mixer.grn",
    "op.out_norm": "mixer.out_norm",
    "op.out_proj": "mixer.out_proj",
    **{f"op.{p}": f"mixer.gspn.{p}" for p in GSPN_PARAMS},
}
_FIXED = {
    "patch_embed.0": "stem.conv1",
    "patch_embed.2": "stem.norm1",
    "patch_embed.5": "stem.conv2",
    "patch_embed.7": "stem.norm2",
    "classifier.norm": "head.norm",
    "classifier.head": "head.fc",
}
_BLOCK = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)\.(\w+)")
_DOWN = re.compile(r"layers\.(\d+)\.downsample\.([13])\.(\w+)")
_NUM_STAGES = 4


def _map_block(key: str) -> str | None:
    m = _BLOCK.fullmatch(key)
    if m and m[3] in _BLOCK_INNER:
        return f"stages.{m[1]}.blocks.{m[2]}.{_BLOCK_INNER[m[3]]}.{m[4]}"
    m = _DOWN.fullmatch(key)
    if m:  # the reference's downsample ends layer i; ours starts stage i + 1
        return f"stages.{int(m[1]) + 1}.downsample.{'conv' if m[2] == '1' else 'norm'}.{m[3]}"
    return None


def _recognises(keys: list[str]) -> bool:
    return any(k.startswith(("patch_embed.", "layers.")) for k in keys)


def _infer_args(shape: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """``embed_dim, depths, d_state, in_chans, expand, mlp_ratio, kernel_size, num_classes``."""
    out: dict[str, Any] = {}
    if "patch_embed.5.weight" in shape:
        out["embed_dim"] = shape["patch_embed.5.weight"][0]
    if "patch_embed.0.weight" in shape:
        out["in_chans"] = shape["patch_embed.0.weight"][1]
    depths: dict[int, int] = {}
    for k in shape:
        m = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", k)
        if m:
            depths[int(m[1])] = max(depths.get(int(m[1]), 0), int(m[2]) + 1)
    if depths:
        out["depths"] = tuple(depths.get(i, 0) for i in range(max(depths) + 1))
    b = "layers.0.blocks.0."
    if f"{b}op.x_conv_down.weight" in shape:
        out["d_state"] = shape[f"{b}op.x_conv_down.weight"][0]
    if f"{b}op.in_proj.weight" in shape and "embed_dim" in out:
        out["expand"] = shape[f"{b}op.in_proj.weight"][0] / out["embed_dim"]
    if f"{b}mlp.fc1.weight" in shape and "embed_dim" in out:
        out["mlp_ratio"] = shape[f"{b}mlp.fc1.weight"][0] / out["embed_dim"]
    if f"{b}op.conv2d.weight" in shape:
        out["kernel_size"] = shape[f"{b}op.conv2d.weight"][-1]
    out["num_classes"] = shape["classifier.head.weight"][0] if "classifier.head.weight" in shape else 0
    return out


def _file_defaults(value: Callable[[str], Any]) -> dict[str, Any]:
    """The feature size per stage (the chunk of the "global" blocks) from ``FEAT_SIZE`` or ``IMG_SIZE``."""
    feat = value("FEAT_SIZE")
    if isinstance(feat, (list, tuple)) and len(feat) == _NUM_STAGES and all(isinstance(v, int) for v in feat):
        return {"global_chunk_sizes": tuple(feat)}
    img = value("IMG_SIZE")
    if isinstance(img, int) and img > 0:
        return {"global_chunk_sizes": tuple(img // 4 // 2**i for i in range(_NUM_STAGES))}
    return {}


CLASSIFIER_KEYS = ReferenceKeyMap(
    kind="classifier",
    default_entry="model",
    # the chunk of the "global" blocks: the reference's configured feature size per stage at 224²
    reference_args={"norm_eps": 1e-5, "conv_act": False, "merge_frame": "scan", "global_chunk_sizes": (56, 28, 14, 7)},
    suggest="gspn_t / gspn_s / gspn_b",
    fixed=_FIXED,
    map_block=_map_block,
    recognises=_recognises,
    infer_args=_infer_args,
    file_defaults=_file_defaults,
)
"""The reference classifier family (training checkpoints with entries ``model``, ``model_ema``)."""
