"""The isotropic GSPN encoders (``gspn_vit_*``): shapes, timm-style API, checkpoints, complexity."""

from __future__ import annotations

import pytest
import torch

from gspn.models import (
    GSPNViT,
    complexity,
    count_params,
    create_model,
    get_default_cfg,
    list_models,
    load_model,
    save_checkpoint,
)
from gspn.nn import GSPN2d

VIT_NAMES = ["gspn_vit_base", "gspn_vit_nano", "gspn_vit_small", "gspn_vit_so400m", "gspn_vit_tiny"]


def _tiny(**kw) -> GSPNViT:
    torch.manual_seed(0)
    args = dict(num_classes=5, embed_dim=16, depth=3, patch_size=4, propagation_channels=4, d_state=4)
    return create_model("gspn_vit_nano", **{**args, **kw})


def test_registered_as_classifiers_with_their_config_source():
    assert list_models("gspn_vit_*") == VIT_NAMES
    assert set(VIT_NAMES) <= set(list_models(task="classification"))
    for name in VIT_NAMES:
        cfg = get_default_cfg(name)
        assert cfg["task"] == "classification" and cfg["classifier"] == "head.fc" and cfg["config_source"]
    with pytest.raises(RuntimeError, match="no pretrained weights"):
        create_model("gspn_vit_nano", pretrained=True)


@pytest.mark.parametrize("hw, grid", [((32, 32), (8, 8)), ((17, 30), (5, 8)), ((3, 4), (1, 1)), ((40, 12), (10, 3))])
def test_shapes_any_input_size(hw, grid):
    m = _tiny()
    x = torch.randn(2, 3, *hw)
    assert m.forward_features(x).shape == (2, 16, *grid)
    assert m(x).shape == (2, 5)
    assert m.forward_head(m.forward_features(x), pre_logits=True).shape == (2, 16)


def test_isotropic_blocks_with_compact_propagation():
    m = create_model("gspn_vit_nano")
    layers = [layer for layer in m.modules() if isinstance(layer, GSPN2d)]
    assert len(layers) == len(m.blocks) == 4
    assert all(
        layer.channels == 64 and layer.propagation_channels == 16 and layer.gate_channels == 1 and layer.is_global
        for layer in layers
    )
    assert [f["num_chs"] for f in m.feature_info] == [64] * 4
    assert {f["reduction"] for f in m.feature_info} == {4}
    assert m.default_cfg["architecture"] == "gspn_vit_nano" and m.pretrained_cfg is m.default_cfg


def test_forward_intermediates():
    m = _tiny().eval()
    x = torch.randn(1, 3, 20, 28)
    final, inter = m.forward_intermediates(x)
    assert len(inter) == 3 and all(t.shape == (1, 16, 5, 7) for t in inter)
    torch.testing.assert_close(final, m.forward_features(x))
    torch.testing.assert_close(inter[-1], final)
    only = m.forward_intermediates(x, indices=[0, -2], intermediates_only=True)
    assert len(only) == 2
    torch.testing.assert_close(only[0], inter[0])
    torch.testing.assert_close(only[1], inter[1])
    assert len(m.forward_intermediates(x, indices=1, intermediates_only=True)) == 1
    with pytest.raises(IndexError):
        m.forward_intermediates(x, indices=[3])


def test_reset_classifier():
    m = _tiny()
    m.reset_classifier(7)
    assert m(torch.randn(1, 3, 16, 16)).shape == (1, 7)
    assert m.default_cfg["num_classes"] == 7 and m.model_args["num_classes"] == 7
    m.reset_classifier(0, global_pool="avg")
    assert m(torch.randn(1, 3, 16, 16)).shape == (1, 16)
    with pytest.raises(ValueError, match="global_pool"):
        m.reset_classifier(3, global_pool="token")


def test_save_load_round_trip_and_head_mismatch(tmp_path):
    m = _tiny().eval()
    path = save_checkpoint(m, tmp_path / "vit.safetensors")
    x = torch.randn(2, 3, 12, 20)
    with torch.no_grad():
        ref = m(x)
        back = load_model(path).eval()
        assert isinstance(back, GSPNViT) and back.model_args == m.model_args
        torch.testing.assert_close(back(x), ref, rtol=0, atol=0)
        with pytest.warns(UserWarning, match="classifier"):
            rehead = load_model(path, num_classes=9).eval()
        assert rehead(x).shape == (2, 9)
        torch.testing.assert_close(rehead.forward_features(x), m.forward_features(x), rtol=0, atol=0)


def test_backward_reaches_every_parameter():
    m = _tiny(drop_path_rate=0.1)
    m.set_grad_checkpointing(True)
    m(torch.randn(2, 3, 12, 16)).logsumexp(-1).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert m.blocks[0].mixer.gspn.proj_in.weight.grad.abs().sum() > 0


def test_fused_equals_unfused():
    m = _tiny().double().eval()
    x = torch.randn(1, 3, 16, 12, dtype=torch.float64)
    with torch.no_grad():
        ref = m(x)
        for layer in m.modules():
            if isinstance(layer, GSPN2d):
                layer.fused = False
        torch.testing.assert_close(m(x), ref)


def test_flops_on_meta():
    with torch.device("meta"):
        m = create_model("gspn_vit_tiny")
    res = complexity(m, (3, 224, 224))
    assert res["params"] == count_params(m) == 5_080_408
    assert res["scan_macs"] > 0 and 0.9e9 < res["macs"] < 1.0e9
    # non-square input: any size, the token grid is ceil(H/16) x ceil(W/16)
    assert complexity(m, (3, 160, 250))["macs"] < res["macs"]
    with torch.device("meta"):
        big = create_model("gspn_vit_so400m")
        vit_like = 27 * 12 * 1152**2  # an attention ViT block of width D has ~12 D² parameters
    assert count_params(big) < 0.9 * vit_like


def test_bad_arguments():
    with pytest.raises(ValueError, match="depth"):
        GSPNViT(depth=0)
    with pytest.raises(ValueError, match="patch_size"):
        GSPNViT(patch_size=0, embed_dim=16, depth=1, propagation_channels=4)
    with pytest.raises(ValueError, match="reference"):
        create_model("gspn_vit_nano", semantics="reference")
