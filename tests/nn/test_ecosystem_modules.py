"""GSPN layers and models inside the tools that act through a module's ``forward``.

Issue 21, kind 1: ``GSPN2d`` handed its projections' ``.weight`` tensors to ``gspn_mix`` (and the
unfused path read ``m_conv.weight``), so a peft LoRA adapter was ignored (its merged model was a
different model), hooks never fired, pruning masks were used stale, and accelerate's CPU offload
raised or computed with uninitialised memory. Every check here asserts values: against the
unfused layer (which calls every module on the real activations) or the unhooked original.
"""

from __future__ import annotations

import copy

import accelerate
import peft
import pytest
import torch
import torch.nn.utils.prune
from torch import nn

import gspn
from gspn.nn import GSPN2d

PROJECTIONS = ["w_conv_up", "l_conv_up", "u_conv_up", "d_conv", "m_conv", "x_conv_down"]
LAYERS = {
    "default": {},
    "local": {"chunk_size": 3},
    "shared gates": {"gate_channels": 2},
    "compact": {"propagation_channels": 6},
}


def _layer(**kwargs) -> GSPN2d:
    torch.manual_seed(0)
    return GSPN2d(16, d_state=4, **kwargs)


def _unfused(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if isinstance(m, GSPN2d):
            m.fused = False
    return module


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("options", list(LAYERS), ids=list(LAYERS))
@pytest.mark.parametrize("targets", [["l_conv_up", "u_conv_up"], ["w_conv_up", "d_conv", "m_conv"], ["x_conv_down"]])
def test_lora_on_any_projection_is_used_trains_and_merges(options, targets):
    """The issue's example: LoRA changes the output, fused equals unfused, adapters get gradients,
    ``merge_and_unload`` keeps the output."""
    layer = _layer(**LAYERS[options])
    x = _x(2, 16, 9, 7)
    ref = layer(x)
    config = peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False)
    torch.manual_seed(2)
    model = peft.get_peft_model(copy.deepcopy(layer), config)
    y = model(x)
    assert (y - ref).abs().max() > 1e-2  # the adapter is used
    unfused = _unfused(copy.deepcopy(model))
    torch.testing.assert_close(y, unfused(x), rtol=1e-6, atol=1e-6)
    y.square().sum().backward()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    merged = model.merge_and_unload()
    assert all(type(getattr(merged, t)) is nn.Conv2d for t in targets)
    torch.testing.assert_close(merged(x), y.detach(), rtol=1e-6, atol=1e-6)


def test_lora_gradients_equal_the_unfused_layers():
    layer = _layer()
    x = _x(2, 16, 6, 5)
    config = peft.LoraConfig(r=2, target_modules=["l_conv_up", "w_conv_up"], init_lora_weights=False)
    torch.manual_seed(3)
    fused = peft.get_peft_model(copy.deepcopy(layer), config)
    unfused = _unfused(copy.deepcopy(fused))
    grads = []
    for model in (fused, unfused):
        model(x).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("lora_" in n for n in grads[0])
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], rtol=1e-5, atol=1e-5, msg=name)


def test_lora_dropout_in_training_draws_per_pixel_like_the_unfused_layer():
    """A stochastic adapter cannot be folded into the kernel's weights: the layer computes as unfused."""
    layer = _layer()
    config = peft.LoraConfig(r=2, target_modules=["l_conv_up"], lora_dropout=0.5, init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(layer), config)
    unfused = _unfused(copy.deepcopy(model))
    x = _x(1, 16, 5, 5)
    model.train()
    unfused.train()
    torch.manual_seed(4)
    y = model(x)
    torch.manual_seed(4)
    torch.testing.assert_close(y, unfused(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", PROJECTIONS)
def test_forward_hooks_fire_with_the_real_activations_and_can_change_the_output(name):
    layer = _layer()
    x = _x(2, 16, 5, 6)
    seen = []

    def double(module, args, output):
        seen.append(tuple(args[0].shape))
        return 2 * output

    hooked = copy.deepcopy(layer)
    getattr(hooked, name).register_forward_hook(double)
    y = hooked(x)
    # the per-pixel maps, not a basis: (B, ·, H, W), or (B, 4, C·H, W) for the merger over directions
    assert seen == [(2, 4, 16 * 5, 6)] if name == "m_conv" else (len(seen) == 1 and seen[0][::2] == (2, 5))
    expected = _unfused(copy.deepcopy(layer))
    handle = getattr(expected, name).register_forward_hook(lambda m, a, o: 2 * o)
    torch.testing.assert_close(y, expected(x), rtol=0, atol=1e-6)
    handle.remove()
    assert (y - layer(x)).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["w_conv_up", "l_conv_up", "m_conv"])
def test_pruning_uses_the_current_mask(name):
    layer = _layer()
    x = _x(2, 16, 5, 6)
    pruned = copy.deepcopy(layer)
    torch.nn.utils.prune.l1_unstructured(getattr(pruned, name), "weight", amount=0.5)
    baked = copy.deepcopy(layer)
    torch.nn.utils.prune.l1_unstructured(getattr(baked, name), "weight", amount=0.5)
    torch.nn.utils.prune.remove(getattr(baked, name), "weight")
    torch.testing.assert_close(pruned(x), baked(x), rtol=0, atol=1e-6)
    # a new mask after the first forward is used too (was: the stale tensor)
    module = getattr(pruned, name)
    module.weight_mask.zero_()
    zeroed = copy.deepcopy(layer)
    with torch.no_grad():
        getattr(zeroed, name).weight.zero_()
    torch.testing.assert_close(pruned(x), zeroed(x), rtol=0, atol=1e-6)


def test_weight_parametrizations_are_used():
    layer = _layer()
    x = _x(1, 16, 5, 5)
    normed = copy.deepcopy(layer)
    torch.nn.utils.parametrizations.weight_norm(normed.u_conv_up)
    torch.testing.assert_close(normed(x), layer(x), rtol=0, atol=1e-5)  # same weight at init
    with torch.no_grad():
        normed.u_conv_up.parametrizations.weight.original0.mul_(3.0)  # the magnitude g
    plain = copy.deepcopy(layer)
    with torch.no_grad():
        plain.u_conv_up.weight.mul_(3.0)
    torch.testing.assert_close(normed(x), plain(x), rtol=0, atol=1e-5)


def _with_bias(conv: nn.Conv2d) -> nn.Conv2d:
    biased = nn.Conv2d(conv.in_channels, conv.out_channels, 1)
    with torch.no_grad():
        biased.weight.copy_(conv.weight)
        biased.bias.normal_()
    return biased


@pytest.mark.parametrize("names", [["l_conv_up"], ["w_conv_up", "m_conv"]])
def test_projections_with_a_bias_compute_exactly(names):
    """A constant term is the weight of an extra proxy channel of ones (the merger's is added)."""
    biased = _layer()
    for name in names:
        setattr(biased, name, _with_bias(getattr(biased, name)))
    x = _x(2, 16, 5, 4)
    torch.testing.assert_close(biased(x), _unfused(copy.deepcopy(biased))(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="constant term"):
        biased.mix_weights()


def test_vmap_over_stacked_adapter_weights_and_fullgraph_compile():
    """Model ensembling (vmap over parameters) and torch.compile(fullgraph=True) of an adapted layer:
    no data-dependent branch on the adapter's values."""
    config = peft.LoraConfig(r=2, target_modules=["u_conv_up", "m_conv"], init_lora_weights=False)
    torch.manual_seed(5)
    model = peft.get_peft_model(_layer(), config)
    x = _x(2, 16, 5, 6)
    lora = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
    stacked = {n: torch.stack([p, 2 * p, -p]) for n, p in lora.items()}

    def call(params):
        return torch.func.functional_call(model, params, (x,), strict=False)

    batched = torch.func.vmap(call)(stacked)
    for i in range(3):
        torch.testing.assert_close(batched[i], call({n: p[i] for n, p in stacked.items()}), rtol=1e-6, atol=1e-6)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_operators_under_autocast_compute_in_their_inputs_dtype(backend):
    """Autocast on the caller's side must not reach inside the operators (was: garbage or NaN from
    the cpu kernel reading a bfloat16 buffer as float32, different on every call)."""
    gen = torch.Generator().manual_seed(0)
    x, z = torch.randn(2, 8, 5, 7, generator=gen), torch.randn(2, 4, 5, 7, generator=gen)
    weights = [torch.randn(*s, generator=gen) for s in ((4, 3, 8, 4), (4, 8, 4), (4, 8, 4), (4, 8, 4), (4,))]
    leaves = [t.clone().requires_grad_() for t in (x, z, *weights)]
    expected = gspn.ops.gspn_mix(*leaves, backend=backend)
    expected_grads = torch.autograd.grad(expected.square().sum(), leaves)
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = gspn.ops.gspn_mix(*leaves, backend=backend)
            grads = torch.autograd.grad(y.square().sum(), leaves)
        torch.testing.assert_close(y, expected, rtol=0, atol=0)
        for g, e in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-5)
    params = [torch.randn(2, 8, 5, 7, generator=gen) for _ in range(4)]
    h = gspn.ops.line_scan_4d(x, *(p.unsqueeze(1) for p in params), normalize=True, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h16 = gspn.ops.line_scan_4d(x, *(p.unsqueeze(1) for p in params), normalize=True, backend=backend)
    torch.testing.assert_close(h16, h, rtol=0, atol=0)


def test_models_under_autocast_are_deterministic_and_match_the_unfused_layers():
    model, (x,) = _model("gspn_nano")
    unfused = _unfused(copy.deepcopy(model))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        runs = [model(x) for _ in range(3)]
        reference = unfused(x)
    assert all(torch.equal(r, runs[0]) for r in runs) and torch.isfinite(runs[0]).all()
    torch.testing.assert_close(runs[0].float(), reference.float(), rtol=0.05, atol=0.05)


def test_mix_weights_of_a_meta_layer_are_meta():
    with torch.device("meta"):
        layer = GSPN2d(16, d_state=4)
    assert all(w.device.type == "meta" for w in layer.mix_weights())


def test_mix_weights_are_the_projection_matrices():
    layer = _layer(gate_channels=2)
    gate, lam, u, skip, merge = layer.mix_weights(torch.float64)
    assert gate.dtype == torch.float64
    torch.testing.assert_close(gate, layer.w_conv_up.weight.double().view(4, 3, 2, 4), rtol=0, atol=0)
    for got, conv in ((lam, layer.l_conv_up), (u, layer.u_conv_up), (skip, layer.d_conv)):
        torch.testing.assert_close(got, conv.weight.double().view(4, 16, 4), rtol=0, atol=0)
    torch.testing.assert_close(merge, layer.m_conv.weight.double().view(4), rtol=0, atol=0)


def test_meta_construction_and_assign_loading():
    layer = _layer(gate_channels=4)
    with torch.device("meta"):
        empty = GSPN2d(16, d_state=4, gate_channels=4)
    empty.load_state_dict(layer.state_dict(), assign=True)
    x = _x(2, 16, 5, 6)
    torch.testing.assert_close(empty(x), layer(x), rtol=0, atol=0)


def _model(name: str) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    if name == "gspn_dit_tiny":
        model = gspn.create_model(name, input_size=8, num_classes=4)
        args = (_x(2, model.in_channels, 8, 8), torch.tensor([3.0, 500.0]), torch.tensor([0, 2]))
    elif name.endswith("sincos"):  # a position embedding computed in forward, on the tokens' device
        model = gspn.create_model(name.split("-")[0], num_classes=5, pos_embed="sincos")
        args = (_x(2, 3, 32, 32),)
    else:
        model = gspn.create_model(name, num_classes=5)
        args = (_x(2, 3, 32, 32),)
    with torch.no_grad():  # away from the zero/constant initialisations, so that every weight matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval(), args


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("name", ["gspn_nano", "gspn_vit_nano", "vit_nano-sincos", "gspn_dit_tiny"])
def test_sequential_and_model_cpu_offload_are_exact(name, fused):
    """What ``pipe.enable_sequential_cpu_offload()`` / ``enable_model_cpu_offload()`` do to a model."""
    model, args = _model(name)
    if not fused:
        _unfused(model)
    with torch.no_grad():
        ref = model(*args)
    sequential = copy.deepcopy(model)
    accelerate.cpu_offload(sequential, execution_device=torch.device("cpu"))
    assert any(p.device.type == "meta" for p in sequential.parameters())  # offloaded between calls
    with torch.no_grad():
        torch.testing.assert_close(sequential(*args), ref, rtol=0, atol=0)
    whole, hook = accelerate.cpu_offload_with_hook(copy.deepcopy(model), execution_device=torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(whole(*args), ref, rtol=0, atol=0)
    hook.offload()
