"""The attention ViT (vit_nano, ...): the teacher of encoder distillation, shaped like GSPN-ViT."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import gspn
from gspn.models import create_model, get_default_cfg, load_model, save_checkpoint
from gspn.models.vit import VisionTransformer, sincos_pos_embed


def _naive_block(block, x):
    """A transformer block in float64 from its weights: softmax(q kᵀ/√d) v per head."""
    b, h, w, c = x.shape
    t = x.reshape(b, h * w, c).double()
    a = block.attn
    y = F.layer_norm(t, (c,), block.norm1.weight.double(), block.norm1.bias.double(), block.norm1.eps)
    qkv = (y @ a.qkv.weight.double().T + a.qkv.bias.double()).view(b, h * w, 3, a.num_heads, a.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(a.head_dim), -1) @ v
    t = t + att.transpose(1, 2).reshape(b, h * w, c) @ a.proj.weight.double().T + a.proj.bias.double()
    y = F.layer_norm(t, (c,), block.norm2.weight.double(), block.norm2.bias.double(), block.norm2.eps)
    m = block.mlp
    y = F.gelu(y @ m.fc1.weight.double().T + m.fc1.bias.double()) @ m.fc2.weight.double().T + m.fc2.bias.double()
    return (t + y).reshape(b, h, w, c)


def test_registered_classifiers_shaped_like_gspn_vit():
    names = gspn.list_models("vit_*")
    assert names == ["vit_base", "vit_nano", "vit_small", "vit_so400m", "vit_tiny"]
    assert set(names) <= set(gspn.list_models(task="classification"))
    for name in names:
        assert get_default_cfg(name)["task"] == "classification"
        with torch.device("meta"):
            vit, gv = create_model(name), create_model("gspn_" + name)
        assert (vit.embed_dim, len(vit.blocks), vit.patch_size) == (gv.embed_dim, len(gv.blocks), gv.patch_size)
        assert vit.blocks[0].mlp.fc1.out_features == gv.blocks[0].mlp.fc1.out_features
        assert vit.default_cfg["architecture"] == name and vit.feature_info == gv.feature_info


@pytest.mark.parametrize(("hw", "grid"), [((32, 32), (8, 8)), ((30, 17), (8, 5)), ((64, 48), (16, 12))])
def test_shapes_any_input_size(hw, grid):
    model = create_model("vit_nano", num_classes=7, in_chans=1)
    x = torch.randn(2, 1, *hw)
    assert model(x).shape == (2, 7)
    assert model.forward_features(x).shape == (2, 64, *grid)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 64)


def test_forward_is_patch_embed_plus_position_then_attention_blocks(assert_close):
    torch.manual_seed(0)
    model = create_model("vit_nano", num_classes=3, depth=2).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    h = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=4) + model.pos_embed
    h = h.permute(0, 2, 3, 1)
    for block in model.blocks:
        h = _naive_block(block, h)
    assert_close(model.forward_features(x), h.permute(0, 3, 1, 2), rtol=1e-10)
    # another grid: the learned embedding is resized bicubically
    x = torch.randn(1, 3, 20, 24, dtype=torch.float64)
    pos = F.interpolate(model.pos_embed, size=(5, 6), mode="bicubic", align_corners=False)
    assert_close(model.position_embedding(5, 6), pos)


def test_sincos_position_embedding_values():
    pe = sincos_pos_embed(8, 3, 4)
    assert pe.shape == (1, 8, 3, 4)
    # channels: sin(row·ω), cos(row·ω), sin(col·ω), cos(col·ω) with ω = (1, 10000^-1/2)
    omega = torch.tensor([1.0, 0.01])
    assert torch.allclose(pe[0, 0:2, 2, 1], torch.sin(2 * omega))
    assert torch.allclose(pe[0, 2:4, 2, 1], torch.cos(2 * omega))
    assert torch.allclose(pe[0, 4:6, 2, 3], torch.sin(3 * omega))
    assert torch.allclose(pe[0, 6:8, 0, 0], torch.ones(2))
    model = create_model("vit_nano", pos_embed="sincos")
    assert model.pos_embed is None and model(torch.randn(1, 3, 12, 20)).shape == (1, 1000)


def test_forward_intermediates_are_the_block_outputs():
    torch.manual_seed(0)
    model = create_model("vit_nano", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    final, blocks = model.forward_intermediates(x)
    assert len(blocks) == 4 and all(b.shape == (2, 64, 8, 8) for b in blocks)
    h = model._embed(x)
    for i, block in enumerate(model.blocks):
        h = block(h)
        torch.testing.assert_close(blocks[i], h.permute(0, 3, 1, 2))
    torch.testing.assert_close(final, model.forward_features(x))
    torch.testing.assert_close(blocks[-1], final)
    only = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
    torch.testing.assert_close(only[0], blocks[0])
    torch.testing.assert_close(only[1], blocks[3])
    assert len(model.forward_intermediates(x, indices=2, intermediates_only=True)) == 2
    with pytest.raises(IndexError):
        model.forward_intermediates(x, indices=[4])


def test_reset_classifier_and_bad_arguments():
    model = create_model("vit_nano", num_classes=10)
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3) and model.default_cfg["num_classes"] == 3
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 64)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="token")
    with pytest.raises(ValueError, match="pos_embed"):
        VisionTransformer(pos_embed="rope")
    with pytest.raises(ValueError, match="divisible"):
        VisionTransformer(embed_dim=64, num_heads=3)
    with pytest.raises(ValueError, match="no published weights"):
        create_model("vit_nano", pretrained=True)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = create_model("vit_nano", num_classes=10, in_chans=1).eval()
    save_checkpoint(model, tmp_path / "vit.safetensors")
    back = load_model(tmp_path / "vit.safetensors").eval()
    assert isinstance(back, VisionTransformer)
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(back(x), model(x))


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_flops_count_attention(device):
    """On CPU tensors too: SDPA's CPU flash kernel has no flop formula, so complexity() uses the math path."""
    from gspn.models.complexity import complexity

    with torch.device(device):
        model = create_model("vit_nano", num_classes=10)
    c = complexity(model, input_size=(3, 32, 32))
    n, d = 64, 64  # tokens, width
    attention = n * d * 3 * d + n * d * d + 2 * n * n * d  # qkv, proj, q kᵀ and (·) v
    mlp = 2 * n * d * 4 * d
    expected = 4 * (attention + mlp) + n * (3 * 4 * 4) * d + d * 10  # 4 blocks, patch embedding, classifier
    assert c["macs"] == expected
