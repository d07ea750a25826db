"""Compact channel propagation (GSPN-2 / C-GSPN): ``GSPN2d(..., propagation_channels=Cp)``."""

from __future__ import annotations

import pytest
import torch

from gspn.models import create_model
from gspn.models.gspn_dit import GSPNDiT
from gspn.nn import GSPN2d, GSPNBlock, GSPNMixer

FULL_KEYS = [
    "x_conv_down.weight",
    "w_conv_up.weight",
    "l_conv_up.weight",
    "u_conv_up.weight",
    "d_conv.weight",
    "m_conv.weight",
]


def _compact(c=12, cp=4, d_state=3, chunk_size=None, gate_channels=None, seed=0, **kw) -> GSPN2d:
    torch.manual_seed(seed)
    m = GSPN2d(
        c, d_state=d_state, chunk_size=chunk_size, gate_channels=gate_channels, propagation_channels=cp, **kw
    ).double()
    with torch.no_grad():
        m.m_conv.weight.copy_(torch.randn_like(m.m_conv.weight))
    return m


def test_off_is_exactly_the_full_layer():
    torch.manual_seed(0)
    default = GSPN2d(8, d_state=4)
    torch.manual_seed(0)
    explicit = GSPN2d(8, d_state=4, propagation_channels=None)
    assert list(default.state_dict()) == FULL_KEYS
    assert not default.is_compact and default.proj_in is None and default.proj_out is None
    for (k, a), (_, b) in zip(default.state_dict().items(), explicit.state_dict().items(), strict=True):
        assert torch.equal(a, b), k  # same keys, shapes and (same seed) values
    assert default.w_conv_up.weight.shape[0] == 12 * 8
    # the models' state_dicts are unchanged too
    keys = list(create_model("gspn_nano", num_classes=3).state_dict())
    assert not any("proj_in" in k or "proj_out" in k for k in keys)


def test_parameters_and_keys_of_the_compact_layer():
    m = GSPN2d(64, d_state=4, propagation_channels=8)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "proj_in.weight": (8, 64, 1, 1),
        "x_conv_down.weight": (4, 8, 1, 1),
        "w_conv_up.weight": (12, 4, 1, 1),  # one gate set shared by all 8 proxy channels
        "l_conv_up.weight": (32, 4, 1, 1),
        "u_conv_up.weight": (32, 4, 1, 1),
        "d_conv.weight": (32, 4, 1, 1),
        "m_conv.weight": (1, 4, 1, 1),
        "proj_out.weight": (64, 8, 1, 1),
    }
    assert m.is_compact and m.gate_channels == 1 and m.scan_channels == 8
    assert "propagation_channels=8" in repr(m)
    assert GSPN2d(64, d_state=4, propagation_channels=8, gate_channels=4).w_conv_up.weight.shape[0] == 48


@pytest.mark.parametrize("hw", [(1, 1), (1, 7), (5, 1), (5, 12), (13, 4)])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_shapes_any_size(hw, chunk_size):
    m = GSPN2d(12, d_state=4, chunk_size=chunk_size, propagation_channels=5)
    assert m(torch.randn(2, 12, *hw)).shape == (2, 12, *hw)


def test_equals_projections_around_a_full_layer_of_cp_channels():
    """compact(x) == proj_out(GSPN2d(Cp)(proj_in(x))): the definition, with shared gates."""
    m = _compact(c=12, cp=4, gate_channels=2, chunk_size=2)
    inner = GSPN2d(4, d_state=3, chunk_size=2, gate_channels=2).double()
    inner.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith(("proj_in", "proj_out"))})
    x = torch.randn(2, 12, 5, 7, dtype=torch.float64)
    with torch.no_grad():
        expected = m.proj_out(inner(m.proj_in(x)))
        torch.testing.assert_close(m(x), expected)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_fused_equals_unfused(chunk_size):
    m = _compact(chunk_size=chunk_size)
    x = torch.randn(2, 12, 6, 5, dtype=torch.float64, requires_grad=True)
    y = m(x)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, *m.parameters()), gy)
    m.fused = False
    y2 = m(x)
    grads2 = torch.autograd.grad(y2, (x, *m.parameters()), gy)
    torch.testing.assert_close(y, y2)
    for a, b in zip(grads, grads2, strict=True):
        torch.testing.assert_close(a, b)


def test_scan_merge_frame_works_compact():
    m = _compact(merge_frame="scan")
    assert m(torch.randn(1, 12, 5, 5, dtype=torch.float64)).shape == (1, 12, 5, 5)


def test_gradient_flows_to_input_and_every_parameter():
    m = GSPN2d(8, d_state=4, chunk_size=2, propagation_channels=3)
    x = torch.randn(2, 8, 5, 6, requires_grad=True)
    m(x).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("fused", [True, False])
def test_gradcheck_float64(fused):
    m = _compact(c=5, cp=3, d_state=2, fused=fused)
    x = torch.randn(1, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    names, params = zip(*m.named_parameters(), strict=True)

    def f(x, *weights):
        return torch.func.functional_call(m, dict(zip(names, weights, strict=True)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, fast_mode=True)


def test_bad_arguments():
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="propagation_channels"):
            GSPN2d(8, propagation_channels=bad)
    with pytest.raises(ValueError, match="gate_channels must be a positive divisor of propagation_channels=6"):
        GSPN2d(8, propagation_channels=6, gate_channels=4)
    with pytest.raises(ValueError, match="channels"):
        GSPN2d(8, propagation_channels=4)(torch.randn(1, 4, 3, 3))


def test_threaded_through_mixer_block_classifier_and_dit():
    mixer = GSPNMixer(16, d_state=4, propagation_channels=6)
    assert mixer.gspn.is_compact and mixer.gspn.channels == 24 and mixer.gspn.scan_channels == 6
    block = GSPNBlock(16, d_state=4, propagation_channels=6)
    x = torch.randn(2, 5, 7, 16)
    assert block(x).shape == x.shape

    net = create_model("gspn_nano", num_classes=3, propagation_channels=(None, 8, 8, 16))
    layers = [m for m in net.modules() if isinstance(m, GSPN2d)]
    assert [m.propagation_channels for m in layers] == [None, 8, 8, 16]
    assert [m.gate_channels for m in layers] == [24, 1, 1, 1]
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    grouped = create_model("gspn_nano", num_classes=3, propagation_channels=8, gate_group_size=4)
    assert {m.gate_channels for m in grouped.modules() if isinstance(m, GSPN2d)} == {2}
    with pytest.raises(ValueError, match="propagation_channels=8"):
        create_model("gspn_nano", propagation_channels=8, gate_group_size=3)
    with pytest.raises(ValueError, match="one entry per stage"):
        create_model("gspn_nano", propagation_channels=(8, 8))

    dit = GSPNDiT(
        input_size=8,
        patch_size=2,
        in_channels=2,
        hidden_size=32,
        depth=3,
        num_classes=2,
        num_global_blocks=1,
        propagation_channels=4,
    )
    assert all(m.is_compact for m in dit.modules() if isinstance(m, GSPN2d))
    out = dit(torch.randn(1, 2, 8, 8), torch.tensor([3.0]), torch.tensor([1]))
    assert out.shape == (1, 4, 8, 8)
