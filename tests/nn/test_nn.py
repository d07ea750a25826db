"""Tests of gspn.nn: the GSPN module's reach and alignment, the mixers, blocks and helpers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gspn.nn import GRN, DropPath, GSPN2d, GSPNAttention, GSPNBlock, GSPNMixer, LayerNorm2d, resolve_hw

TB, BT, LR, RL = range(4)
LEFT, MID, RIGHT = range(3)


def _module(channels=6, d_state=3, chunk_size=None, gate_channels=None, seed=0) -> GSPN2d:
    torch.manual_seed(seed)
    m = GSPN2d(channels, d_state=d_state, chunk_size=chunk_size, gate_channels=gate_channels).double()
    with torch.no_grad():
        m.m_conv.weight.copy_(torch.randn_like(m.m_conv.weight))  # unequal merge weights: a real test
    return m


def _permuted(m: GSPN2d, dir_perm: list[int], swap_gates: set[int]) -> GSPN2d:
    """Copy of ``m`` whose direction ``k`` uses ``m``'s direction ``dir_perm[k]``.

    Directions in ``swap_gates`` also exchange their left and right gate.
    """
    out = GSPN2d(m.channels, m.d_state, m.chunk_size, m.gate_channels).double()
    out.load_state_dict(m.state_dict())
    gc, c = m.gate_channels, m.channels
    with torch.no_grad():
        w = m.w_conv_up.weight.view(4, 3, gc, m.d_state)
        gate_order = [[RIGHT, MID, LEFT] if k in swap_gates else [LEFT, MID, RIGHT] for k in range(4)]
        new_w = torch.stack([w[dir_perm[k]][gate_order[k]] for k in range(4)])
        out.w_conv_up.weight.copy_(new_w.reshape_as(m.w_conv_up.weight))
        for name in ("l_conv_up", "u_conv_up", "d_conv"):
            src = getattr(m, name).weight.view(4, c, m.d_state)
            getattr(out, name).weight.copy_(src[dir_perm].reshape_as(getattr(m, name).weight))
        out.m_conv.weight.copy_(m.m_conv.weight[:, dir_perm])
    return out


# --- reach -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(7, 7), (6, 9)], ids=["square", "non-square"])
def test_global_impulse_reaches_every_pixel(hw):
    m = _module()
    x0 = torch.randn(1, 6, *hw, dtype=torch.float64)
    r, c = hw[0] // 3, hw[1] - 2
    x1 = x0.clone()
    x1[0, :, r, c] += 1.0
    with torch.no_grad():
        diff = (m(x1) - m(x0)).abs().amax(dim=1)[0]
    assert (diff > 1e-12).all(), f"pixels not reached: {(diff <= 1e-12).nonzero().tolist()}"


def test_local_impulse_stays_in_its_tiles():
    m = _module(chunk_size=2)
    x0 = torch.randn(1, 6, 8, 8, dtype=torch.float64)
    x1 = x0.clone()
    x1[0, :, 2, 2] += 1.0  # tile rows [2, 4), tile columns [2, 4)
    with torch.no_grad():
        diff = (m(x1) - m(x0)).abs().amax(dim=1)[0]
    reached = diff > 1e-12
    assert reached[2, 2]
    band = torch.zeros(8, 8, dtype=torch.bool)
    band[2:4, :] = True
    band[:, 2:4] = True
    assert not reached[~band].any()


def test_merger_mixes_all_four_directions():
    m = _module()
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64, requires_grad=True)
    m(x).square().sum().backward()
    assert (m.m_conv.weight.grad.abs() > 0).all()


# --- alignment: flips and transposes are equivariances once the directions are relabelled ----------


@pytest.mark.parametrize("chunk_size", [None, 2], ids=["global", "local"])
@pytest.mark.parametrize(
    "transform, dir_perm, swap_gates",
    [
        (lambda t: t.flip(-2), [BT, TB, LR, RL], {LR, RL}),  # vertical flip
        (lambda t: t.flip(-1), [TB, BT, RL, LR], {TB, BT}),  # horizontal flip
        (lambda t: t.transpose(-1, -2), [LR, RL, TB, BT], set()),  # transpose
    ],
    ids=["flip_h", "flip_w", "transpose"],
)
def test_transformed_input_with_matching_parameters_transforms_the_output(transform, dir_perm, swap_gates, chunk_size):
    m = _module(chunk_size=chunk_size)
    m2 = _permuted(m, dir_perm, swap_gates)
    x = torch.randn(2, 6, 6, 8, dtype=torch.float64)  # sides divisible by the chunk: tiles map to tiles
    with torch.no_grad():
        torch.testing.assert_close(m2(transform(x)), transform(m(x)), rtol=1e-10, atol=1e-10)


def test_unmatched_parameters_are_not_equivariant():
    """Sanity check of the test above: without relabelling, a flip does not commute."""
    m = _module()
    x = torch.randn(1, 6, 6, 8, dtype=torch.float64)
    with torch.no_grad():
        assert not torch.allclose(m(x.flip(-2)), m(x).flip(-2), atol=1e-6)


# --- options, shapes, gradients -------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(1, 1), (1, 9), (5, 1), (5, 12), (13, 4)])
@pytest.mark.parametrize("chunk_size", [None, 2, 3])
def test_shapes_any_size(hw, chunk_size):
    m = GSPN2d(8, d_state=4, chunk_size=chunk_size)
    assert m(torch.randn(2, 8, *hw)).shape == (2, 8, *hw)


def test_gradient_flows_to_input_and_every_parameter():
    m = GSPN2d(8, d_state=4, chunk_size=2, gate_channels=2)
    x = torch.randn(2, 8, 5, 6, requires_grad=True)
    m(x).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("chunk_size, gate_channels", [(None, None), (2, 2)], ids=["global", "local-shared"])
def test_gradcheck_float64(chunk_size, gate_channels):
    m = _module(channels=4, d_state=2, chunk_size=chunk_size, gate_channels=gate_channels)
    x = torch.randn(1, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    names, params = zip(*m.named_parameters(), strict=True)

    def f(x, *weights):
        return torch.func.functional_call(m, dict(zip(names, weights, strict=True)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, fast_mode=True)


def test_shared_gates_equal_repeated_per_channel_gates():
    shared = _module(channels=6, gate_channels=2)
    full = GSPN2d(6, d_state=3).double()
    state = dict(shared.state_dict())
    w = state["w_conv_up.weight"].view(4, 3, 2, 3).repeat_interleave(3, dim=2)
    state["w_conv_up.weight"] = w.reshape(4 * 3 * 6, 3, 1, 1)
    full.load_state_dict(state)
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(shared(x), full(x))
    assert shared.w_conv_up.weight.numel() == 12 * 2 * 3


def test_bad_arguments():
    with pytest.raises(ValueError, match="gate_channels"):
        GSPN2d(6, gate_channels=4)
    with pytest.raises(ValueError, match="chunk_size"):
        GSPN2d(6, chunk_size=0)
    with pytest.raises(ValueError, match="channels"):
        GSPN2d(6)(torch.randn(1, 5, 3, 3))
    with pytest.raises(ValueError, match="backend must be one of"):
        GSPN2d(6, backend="bogus")
    with pytest.raises(ValueError, match="d_state must be a positive int, got 0"):
        GSPN2d(6, d_state=0)
    with pytest.raises(TypeError, match="chunk_size"):
        GSPN2d(6, chunk_size=2.0)


# --- token mixer -----------------------------------------------------------------------------------


def test_attention_non_square_and_equals_the_map_mixer():
    torch.manual_seed(0)
    attn = GSPNAttention(16, d_state=4, chunk_size=2)
    x = torch.randn(2, 5 * 7, 16)
    y = attn(x, hw=(5, 7))
    assert y.shape == x.shape
    torch.testing.assert_close(y, GSPNMixer.forward(attn, x.view(2, 5, 7, 16)).reshape(2, 35, 16))
    assert GSPNAttention(16, hw=(7, 5), d_state=4)(x).shape == x.shape  # grid given at construction


def test_attention_infers_square_grid_only():
    attn = GSPNAttention(8, d_state=2)
    assert attn(torch.randn(1, 36, 8)).shape == (1, 36, 8)
    with pytest.raises(ValueError, match="perfect square"):
        attn(torch.randn(1, 35, 8))
    with pytest.raises(ValueError, match="tokens"):
        attn(torch.randn(1, 35, 8), hw=(6, 6))
    assert resolve_hw(12, (3, 4)) == (3, 4)


def test_block_shapes_and_backward():
    blk = GSPNBlock(16, d_state=4, chunk_size=2, drop_path=0.1)
    x = torch.randn(2, 6, 9, 16, requires_grad=True)
    y = blk(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert all(p.grad is not None for p in blk.parameters())


# --- helpers ---------------------------------------------------------------------------------------


def test_layernorm2d_matches_channel_layernorm():
    ln = LayerNorm2d(5)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(2, 5, 3, 4)
    ref = F.layer_norm(x.permute(0, 2, 3, 1), (5,), ln.weight, ln.bias, 1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(ln(x), ref)


def test_grn_is_identity_at_init_and_normalises():
    grn = GRN(4)
    x = torch.randn(2, 3, 5, 4)
    torch.testing.assert_close(grn(x), x)
    with torch.no_grad():
        grn.gamma.fill_(1.0)
    gx = x.pow(2).sum(dim=(1, 2), keepdim=True).sqrt()
    torch.testing.assert_close(grn(x), x + x * gx / (gx.mean(-1, keepdim=True) + 1e-6))


def test_drop_path():
    dp = DropPath(0.5)
    x = torch.ones(1000, 3)
    dp.eval()
    assert torch.equal(dp(x), x)
    dp.train()
    y = dp(x)
    assert set(y.unique().tolist()) <= {0.0, 2.0}
    assert 0.4 < (y[:, 0] > 0).float().mean() < 0.6
    with pytest.raises(ValueError):
        DropPath(1.0)
