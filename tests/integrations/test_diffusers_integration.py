"""GSPN in diffusers UNets: swap, shapes, grids, gradient checkpointing, save/load, chunked cross-attention.

Everything runs on the tiny, randomly initialised models of ``tests/tiny_diffusers.py`` (no download).
Distillation and generation are tested in ``tests/recipes``, their commands in ``tests/commands``.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from gspn.integrations.diffusers import (
    ChunkedAttnProcessor,
    GSPNAdapter,
    GSPNAttnProcessor,
    find_self_attention,
    swap_self_attention,
)
from tiny_diffusers import CROSS_DIM, LAYOUTS, tiny_unet, unet_inputs


def run(unet, layout, h, w, **extra):
    args, kwargs = unet_inputs(layout, h, w)
    with torch.no_grad():
        return unet(*args, **kwargs, **extra).sample


# ---------------------------------------------------------------------------------------- swap
@pytest.mark.parametrize("layout", LAYOUTS)
def test_swap_replaces_exactly_the_self_attention(layout):
    unet = tiny_unet(layout)
    before = dict(unet.attn_processors)
    attn1 = [n for n, m in unet.named_modules() if n.endswith("attn1") and isinstance(m, Attention)]
    assert len(attn1) == {"sd15": 4, "sdxl": 8}[layout]
    reference = run(unet, layout, 8, 8)

    adapter = swap_self_attention(unet, d_state=4)
    after = unet.attn_processors
    swapped = sorted(k for k, v in after.items() if isinstance(v, GSPNAttnProcessor))
    assert swapped == sorted(f"{n}.processor" for n in attn1) == sorted(find_self_attention(unet))
    for key, proc in after.items():  # cross-attention processors are the very same objects
        if key not in swapped:
            assert proc is before[key] and "attn2" in key
    assert len(adapter.processors) == len(attn1)
    assert {id(p) for p in adapter.parameters()} == {id(p) for k in swapped for p in unet.get_submodule(k).parameters()}
    assert not torch.allclose(run(unet, layout, 8, 8), reference)
    assert adapter.mount(unet) is adapter  # mounting twice on the same UNet is a no-op
    with pytest.raises(ValueError, match="already has a GSPN processor"):
        swap_self_attention(unet, d_state=4)
    adapter.unmount()
    assert all(unet.attn_processors[k] is before[k] for k in before)
    assert torch.equal(run(unet, layout, 8, 8), reference)


def test_processor_initialised_from_the_attention():
    unet = tiny_unet("sd15")
    adapter = swap_self_attention(unet, d_state=4)
    for key, proc in zip(adapter.config.layer_names, adapter.processors, strict=True):
        attn = unet.get_submodule(key.removesuffix(".processor"))
        assert proc.to_out is None  # the mixer's output projection is the host's to_out
        assert torch.equal(proc.mixer.out_proj.weight, attn.to_out[0].weight)
        assert torch.equal(proc.out_bias, attn.to_out[0].bias)
        assert torch.equal(proc.mixer.in_proj.weight, attn.to_v.weight)
    fresh = GSPNAdapter.from_unet(tiny_unet("sd15"), init_from_attention=False)
    fresh_w, init_w = fresh.processors[0].mixer.out_proj.weight, adapter.processors[0].mixer.out_proj.weight
    assert not torch.equal(fresh_w, init_w)
    # a host whose output width differs gets a separate to_out; nothing of its 24-wide inner
    # projections fits, so only out_proj starts as the identity
    odd = Attention(16, heads=2, dim_head=8, out_dim=24)
    proc = GSPNAttnProcessor(16, 24, d_state=4)
    assert proc.init_from_attention(odd) == ["out_proj=identity"]
    proc.hw = (2, 3)
    assert proc(odd, torch.randn(1, 6, 16)).shape == (1, 6, 24)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("hw", [(8, 8), (8, 12), (12, 4), (7, 5)])
def test_output_shapes_match_original(layout, hw):
    unet = tiny_unet(layout)
    ref = run(unet, layout, *hw)
    adapter = swap_self_attention(unet, d_state=4)
    out = run(unet, layout, *hw)
    assert out.shape == ref.shape == (2, 4, *hw)
    assert torch.isfinite(out).all()
    # every processor saw its transformer's own grid: the latent itself at the first level (SD-1.5),
    # the (ceil) half-size one at the second (SD-XL has no attention at the first level)
    seen = record_grids(adapter)
    run(unet, layout, *hw)
    half = ((hw[0] + 1) // 2, (hw[1] + 1) // 2)
    assert set(seen.values()) == ({hw, half} if layout == "sd15" else {half})
    assert all(p.hw is None for p in adapter.processors)  # passed with each call, never stored


def record_grids(adapter) -> dict[str, tuple[int, int]]:
    """The grid (``hw=``) each GSPN processor of ``adapter`` is called with, by layer (last call)."""
    seen = {}
    for key, proc in zip(adapter.config.layer_names, adapter.processors, strict=True):
        proc.register_forward_pre_hook(lambda m, a, kw, k=key: seen.__setitem__(k, kw.get("hw")), with_kwargs=True)
    return seen


def test_grid_comes_from_the_latent_not_the_token_count():
    """4×16 latents give 64 tokens, a perfect square: a guess would say 8×8."""
    unet = tiny_unet("sd15")
    adapter = swap_self_attention(unet, d_state=4)
    seen = record_grids(adapter)
    run(unet, "sd15", 4, 16)
    assert seen["down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"] == (4, 16)
    assert seen["mid_block.attentions.0.transformer_blocks.0.attn1.processor"] == (2, 8)
    # a grid that does not fit the tokens is an error, never a silent reshape
    proc = adapter.processors[0]
    attn = unet.get_submodule(adapter.config.layer_names[0].removesuffix(".processor"))
    with pytest.raises(RuntimeError, match=r"64 tokens but a grid of \(3, 3\)"):
        proc(attn, torch.randn(1, 64, 16), hw=(3, 3))
    proc.hw = (3, 3)
    with pytest.raises(RuntimeError, match=r"64 tokens but a grid of \(3, 3\)"):
        proc(attn, torch.randn(1, 64, 16))
    assert proc(attn, torch.randn(1, 64, 16), hw=(4, 16)).shape == (1, 64, 16)  # the call's grid wins


def _twin_unets(layout: str):
    """Two identical UNets with identical mounted adapters (weights moved off their initialisation)."""
    unet_a, unet_b = tiny_unet(layout), tiny_unet(layout)
    adapter_a = swap_self_attention(unet_a, d_state=4)
    with torch.no_grad():
        for p in adapter_a.parameters():
            p.add_(0.05 * torch.randn_like(p))
    adapter_b = GSPNAdapter.from_unet(unet_b, d_state=4)
    adapter_b.load_state_dict(adapter_a.state_dict())
    adapter_b.mount(unet_b)
    return unet_a, unet_b


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_with_several_sizes_before_one_backward(reentrant):
    """Recomputation in the backward pass uses the grid of the tensors it recomputes: 4×16 and 8×8
    latents have the same token count (64, then 16), so a grid left over by the last forward would
    not even raise, only give wrong gradients."""
    plain, ckpt = _twin_unets("sd15")
    func = None
    if reentrant:

        def func(module, *args):
            return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=True)

    ckpt.enable_gradient_checkpointing(func)
    sizes = [(12, 8), (4, 16), (8, 8)]
    for unet in (plain, ckpt):
        unet.train()
        loss = 0.0
        for i, hw in enumerate(sizes):
            args, kwargs = unet_inputs("sd15", *hw)
            loss = loss + (i + 1) * unet(*args, **kwargs).sample.square().mean()
        loss.backward()
    grads = {n: p.grad for n, p in plain.named_parameters()}
    for name, p in ckpt.named_parameters():
        if grads[name] is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any("attn1.processor" in n and g is not None for n, g in grads.items())


def test_replaced_processors_are_noticed_and_mount_puts_them_back():
    unet = tiny_unet("sd15")
    adapter = swap_self_attention(unet, d_state=4)
    names = list(adapter.config.layer_names)
    reference = run(unet, "sd15", 8, 12)
    unet.set_attention_slice(1)  # what pipe.enable_attention_slicing() does: every layer replaced
    assert adapter.mounted_unet is None and adapter.replaced_layers() == names
    with pytest.warns(UserWarning, match=r"4 of the 4 GSPN processors.*SlicedAttnProcessor.*NOT running GSPN"):
        sliced = run(unet, "sd15", 8, 12)
    assert not torch.allclose(sliced, reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per mount, not every call
        run(unet, "sd15", 8, 12)
    assert adapter.mount(unet) is adapter
    procs = unet.attn_processors
    assert all(procs[n] is p for n, p in zip(names, adapter.processors, strict=True))
    assert all(type(p).__name__ == "SlicedAttnProcessor" for n, p in procs.items() if n not in names)
    assert adapter.mounted_unet is unet and adapter.replaced_layers() == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(run(unet, "sd15", 8, 12), reference, rtol=1e-4, atol=1e-5)
    # one layer replaced by hand: the truth is still read from the UNet
    unet.set_attn_processor({**unet.attn_processors, names[1]: AttnProcessor2_0()})
    assert adapter.mounted_unet is None and adapter.replaced_layers() == [names[1]]
    with pytest.warns(UserWarning, match=r"1 of the 4 GSPN processors.*AttnProcessor2_0"):
        run(unet, "sd15", 8, 12)
    adapter.mount(unet)
    assert adapter.mounted_unet is unet
    adapter.unmount()
    assert adapter.mounted_unet is None
    assert not any(isinstance(p, GSPNAttnProcessor) for p in unet.attn_processors.values())


def test_attention_mask_warning_once_per_adapter():
    unet = tiny_unet("sd15")
    adapter = swap_self_attention(unet, d_state=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # 4 GSPN layers, 2 calls
            run(unet, "sd15", 8, 8, attention_mask=torch.ones(2, 5))
    assert [str(w.message) for w in caught if "attention_mask" in str(w.message)] == [
        "GSPNAttnProcessor ignores attention_mask (GSPN mixes the full grid)"
    ]
    other = GSPNAdapter.from_unet(tiny_unet("sd15"), d_state=4)  # another adapter warns on its own
    attn = unet.get_submodule(adapter.config.layer_names[0].removesuffix(".processor"))
    with pytest.warns(UserWarning, match="attention_mask"):
        other.processors[0](attn, torch.randn(1, 12, 16), attention_mask=torch.ones(1, 12), hw=(3, 4))


def test_kwargs_and_attention_mask_are_handled():
    unet = tiny_unet("sd15")
    adapter = swap_self_attention(unet, d_state=4)
    out = run(unet, "sd15", 8, 8, cross_attention_kwargs={"scale": 0.5})
    assert out.shape == (2, 4, 8, 8)
    proc = adapter.processors[0]
    attn = unet.get_submodule(adapter.config.layer_names[0].removesuffix(".processor"))
    x = torch.randn(1, 12, 16)
    proc.hw = (3, 4)  # a fixed grid for direct calls
    with pytest.warns(UserWarning, match="attention_mask"):
        y = proc(attn, x, attention_mask=torch.ones(1, 12), scale=1.0, unknown_kwarg=3)
    assert y.shape == x.shape
    # 4-D input carries its own grid; teacher mode gives back the softmax attention
    assert proc(attn, torch.randn(1, 16, 3, 5)).shape == (1, 16, 3, 5)
    with adapter.teacher_mode():
        assert torch.equal(proc(attn, x), AttnProcessor2_0()(attn, x))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_save_load_round_trip(layout, tmp_path):
    unet = tiny_unet(layout)
    base = copy.deepcopy(unet)
    adapter = swap_self_attention(unet, d_state=4, chunk_size=2)
    with torch.no_grad():  # make the weights differ from a fresh initialisation
        for p in adapter.parameters():
            p.add_(0.01 * torch.randn_like(p))
    expected = run(unet, layout, 6, 10)
    adapter.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = GSPNAdapter.from_pretrained(tmp_path / "adapter")
    assert loaded.config.chunk_size == 2 and loaded.config.layer_names == adapter.config.layer_names
    loaded.mount(base)
    assert torch.equal(run(base, layout, 6, 10), expected)


def test_adapter_follows_the_unet_dtype():
    unet = tiny_unet("sd15").to(torch.bfloat16)
    adapter = swap_self_attention(unet, d_state=4)
    assert {p.dtype for p in adapter.parameters()} == {torch.bfloat16}
    (x, t, emb), _ = unet_inputs("sd15", 6, 10)
    with torch.no_grad():
        out = unet(x.bfloat16(), t, emb.bfloat16()).sample
    assert out.dtype == torch.bfloat16 and out.shape == (2, 4, 6, 10) and torch.isfinite(out).all()


def test_chunked_cross_attention_is_exact():
    torch.manual_seed(0)
    attn = Attention(16, cross_attention_dim=CROSS_DIM, heads=2, dim_head=8)
    x, ctx = torch.randn(2, 37, 16), torch.randn(2, 5, CROSS_DIM)
    ref = AttnProcessor2_0()(attn, x, ctx)
    assert torch.allclose(ChunkedAttnProcessor(8)(attn, x, ctx), ref, atol=1e-6)
    mask = torch.ones(2, 5)
    mask[:, -1] = 0
    assert torch.allclose(
        ChunkedAttnProcessor(10)(attn, x, ctx, attention_mask=mask),
        AttnProcessor2_0()(attn, x, ctx, attention_mask=mask),
        atol=1e-6,
    )


# ---------------------------------------------------------------------------------------- benchmark
def test_unet_swap_benchmark_runs(monkeypatch, capsys):
    import runpy

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "unet_swap.py"
    argv = [
        str(script),
        "--widths",
        "32",
        "64",
        "--heads",
        "2",
        "--context-dim",
        "32",
        "--sizes",
        "8",
        "6x10",
        "--repeats",
        "1",
        "--warmup",
        "0",
    ]
    monkeypatch.setattr("sys.argv", argv)
    runpy.run_path(str(script), run_name="__main__")
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.rstrip().endswith("x")]
    assert len(rows) == 2 and "6x10" in rows[1]
