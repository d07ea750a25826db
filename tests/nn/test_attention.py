"""gspn.nn.attention: the one softmax self-attention and the one linear attention of the library."""

from __future__ import annotations

import pytest
import torch

from gspn.nn import LinearAttention, MultiHeadSelfAttention, linear_attention


def _naive_heads(layer, x):
    """q, k, v ``(B, heads, N, d)`` from the ``qkv`` weights, written out per head in float64."""
    c = x.shape[-1]
    h, d = layer.num_heads, c // layer.num_heads
    w, bias = layer.qkv.weight.double(), layer.qkv.bias.double()
    out = []
    for part in range(3):  # q rows, then k rows, then v rows; head-major inside each
        wp, bp = w[part * c : (part + 1) * c], bias[part * c : (part + 1) * c]
        y = x.double() @ wp.T + bp  # (B, N, C)
        out.append(torch.stack([y[..., i * d : (i + 1) * d] for i in range(h)], dim=1))
    return out


def _naive_softmax_attention(layer, x):
    """``proj(concat_h softmax(q_h k_hᵀ / √d) v_h)`` in float64, loops over heads."""
    q, k, v = _naive_heads(layer, x)
    d = q.shape[-1]
    heads = []
    for i in range(q.shape[1]):
        scores = q[:, i] @ k[:, i].transpose(-2, -1) / d**0.5
        heads.append(torch.softmax(scores, dim=-1) @ v[:, i])
    cat = torch.cat(heads, dim=-1)
    return cat @ layer.proj.weight.double().T + layer.proj.bias.double()


def test_self_attention_matches_float64_naive_softmax(assert_close):
    torch.manual_seed(0)
    layer = MultiHeadSelfAttention(12, num_heads=3)
    x = torch.randn(2, 17, 12)
    expected = _naive_softmax_attention(layer, x)
    assert_close(layer.double()(x.double()), expected, rtol=1e-12, atol=1e-14)
    assert_close(layer.float()(x).double(), expected, rtol=1e-5, atol=1e-6)


def test_self_attention_on_a_channels_last_map_is_attention_over_all_pixels():
    torch.manual_seed(1)
    layer = MultiHeadSelfAttention(8, num_heads=2).double()
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (2, 3, 5, 8)
    torch.testing.assert_close(y, layer(x.reshape(2, 15, 8)).reshape(2, 3, 5, 8))
    torch.testing.assert_close(y.reshape(2, 15, 8), _naive_softmax_attention(layer, x.reshape(2, 15, 8)))


def test_self_attention_parameters_have_timm_names_and_sizes():
    layer = MultiHeadSelfAttention(16, num_heads=4, qkv_bias=False)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {"qkv.weight": (48, 16), "proj.weight": (16, 16), "proj.bias": (16,)}


def test_attention_dropout_only_in_training():
    torch.manual_seed(2)
    layer = MultiHeadSelfAttention(8, num_heads=2, attn_drop=0.5)
    x = torch.randn(1, 6, 8)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    torch.manual_seed(3)
    a = layer(x)
    torch.manual_seed(4)
    assert not torch.allclose(a, layer(x))


@pytest.mark.parametrize("cls", [MultiHeadSelfAttention, LinearAttention])
def test_arguments_are_checked_by_name(cls):
    with pytest.raises(ValueError, match="num_heads"):
        cls(10, num_heads=3)
    with pytest.raises(ValueError, match="num_heads"):
        cls(8, num_heads=0)
    with pytest.raises(ValueError, match="dim"):
        cls(0, num_heads=1)
    with pytest.raises(ValueError, match="x must be"):
        cls(8, num_heads=2)(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="proj_drop"):
        cls(8, num_heads=2, proj_drop=1.0)
    if cls is MultiHeadSelfAttention:
        with pytest.raises(ValueError, match="attn_drop"):
            cls(8, num_heads=2, attn_drop=-0.1)


def test_linear_attention_layer_matches_quadratic_form(assert_close):
    torch.manual_seed(5)
    layer = LinearAttention(12, num_heads=3).double()
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    q, k, v = _naive_heads(layer, x)
    phi_q, phi_k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    weights = phi_q @ phi_k.transpose(-2, -1)
    heads = (weights @ v) / (weights.sum(-1, keepdim=True) + 1e-6)
    expected = heads.transpose(1, 2).reshape(2, 9, 12) @ layer.proj.weight.T + layer.proj.bias
    assert_close(layer(x), expected, rtol=1e-12, atol=1e-14)
    assert_close(linear_attention(q, k, v), heads, rtol=1e-12, atol=1e-14)
