"""The public API: the names each package exports. Removing or renaming one is a breaking change and
must change this list (and the CHANGELOG) on purpose."""

from __future__ import annotations

import importlib

import pytest

PUBLIC = {
    "gspn": {"__version__", "create_model", "list_models", "models", "nn", "ops"},
    "gspn.ops": {
        "DIRECTIONS",
        "available_backends",
        "gspn_mix",
        "line_scan",
        "line_scan_4d",
        "mix_flops",
        "scan_flops",
        "stabilize",
    },
    "gspn.nn": {
        "DropPath",
        "GRN",
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
    },
    "gspn.models": {
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
    },
    "gspn.datasets": {
        "DataBundle",
        "DigitsDataset",
        "IMAGE_EXTENSIONS",
        "ImageFolderDataset",
        "Transform",
        "build_data",
        "center_crop_resize",
        "random_resized_crop",
    },
}

#: Additions announced in work under way (may or may not be exported yet).
PENDING: dict[str, set[str]] = {}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_are_pinned(module):
    mod = importlib.import_module(module)
    exported = set(mod.__all__)
    assert len(exported) == len(mod.__all__), "duplicate names in __all__"
    assert PUBLIC[module] <= exported, f"removed from {module}: {sorted(PUBLIC[module] - exported)}"
    extra = exported - PUBLIC[module] - PENDING.get(module, set())
    assert not extra, f"new in {module}.__all__ (add them to this test and the CHANGELOG): {sorted(extra)}"
    for name in exported:
        assert getattr(mod, name) is not None, name


def test_command_line_api():
    from gspn import commands

    assert callable(commands.main) and callable(commands.build_parser)
    from gspn.recipes.bench import LinearAttention, SelfAttention  # names of the benchmark module

    assert callable(SelfAttention) and callable(LinearAttention)
