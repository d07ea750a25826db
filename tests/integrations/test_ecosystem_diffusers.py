"""A GSPN-swapped diffusers UNet under the tools that move, copy or trace it.

* accelerate's offloading (``accelerate.cpu_offload``, what ``pipe.enable_sequential_cpu_offload()``
  runs per component, and ``cpu_offload_with_hook``, what ``pipe.enable_model_cpu_offload()`` runs):
  the GSPN weights are offloaded and loaded like any others and the output is bit for bit the
  unoffloaded one. On this CPU-only machine the execution device is the CPU: sequential offload
  still moves every weight to ``meta`` between calls and back, which is what broke before
  (``Cannot copy out of meta tensor`` when the hook on the processor tried to move the host
  ``Attention`` it was passed).
* copies: ``copy.deepcopy``, ``torch.optim.swa_utils.AveragedModel`` (EMA copies),
  ``torch.save``/``torch.load`` of the whole module, ``torch.compile``. Each computes exactly what the
  original computes at every latent shape; before, a copy ran with the original's hooks, scanned a
  4×16 latent as 8×8 and refused 8×16, and pickling failed on a weakref.

The tiny UNets and pipeline are those of ``tests/tiny_diffusers.py``.
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import accelerate
from diffusers.models.attention_processor import AttnProcessor2_0
from torch.optim.swa_utils import AveragedModel

from gspn.integrations.diffusers import GSPNAdapter, GSPNAttnProcessor, swap_self_attention
from tiny_diffusers import LAYOUTS, tiny_pipe, tiny_unet, unet_inputs

CPU = torch.device("cpu")
# 4×16 has 64 tokens, a perfect square (8×8 if guessed); 8×16 and 16×8 have the same token count
SHAPES = [(8, 8), (4, 16), (8, 16), (16, 8)]


def mounted(layout: str) -> tuple[torch.nn.Module, GSPNAdapter]:
    """A tiny UNet with a mounted adapter whose weights are moved off their initialisation."""
    unet = tiny_unet(layout)
    adapter = swap_self_attention(unet, d_state=4)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return unet, adapter


def forward(unet, layout, hw, **extra) -> torch.Tensor:
    args, kwargs = unet_inputs(layout, *hw)
    with torch.no_grad():
        return unet(*args, **kwargs, **extra).sample


def outputs(unet, layout, shapes=SHAPES) -> dict[tuple[int, int], torch.Tensor]:
    return {hw: forward(unet, layout, hw) for hw in shapes}


def assert_same_outputs(unet, layout, expected: dict) -> None:
    for hw, ref in expected.items():
        out = forward(unet, layout, hw)
        torch.testing.assert_close(out, ref, rtol=0, atol=0, msg=lambda m, hw=hw: f"latent {hw}: {m}")


def gspn_processors(unet) -> list[GSPNAttnProcessor]:
    return [p for p in unet.attn_processors.values() if isinstance(p, GSPNAttnProcessor)]


# ---------------------------------------------------------------------------------------- offload
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sequential_cpu_offload_equals_the_unoffloaded_unet(layout):
    unet, adapter = mounted(layout)
    original = copy.deepcopy(unet)
    adapter_ref = outputs(unet, layout, [(4, 16), (8, 16)])
    with adapter.teacher_mode():
        teacher_ref = forward(unet, layout, (4, 16))
    adapter.unmount()
    plain_ref = forward(unet, layout, (4, 16))
    adapter.mount(unet)

    accelerate.cpu_offload(unet, execution_device=CPU)
    procs = gspn_processors(unet)
    assert len(procs) == len(adapter.processors)
    # the GSPN weights really are offloaded between calls (the processors' own bias included)
    assert {p.device.type for proc in procs for p in proc.parameters()} == {"meta"}
    assert_same_outputs(unet, layout, adapter_ref)
    assert {p.device.type for proc in procs for p in proc.parameters()} == {"meta"}
    with adapter.teacher_mode():  # the host's softmax attention, called through its offloaded modules
        torch.testing.assert_close(forward(unet, layout, (4, 16)), teacher_ref, rtol=0, atol=0)
    # unmounting an offloaded UNet restores its original processors and output; mounting again
    # brings back the (still offloaded) GSPN processors
    adapter.unmount()
    assert not gspn_processors(unet)
    torch.testing.assert_close(forward(unet, layout, (4, 16)), plain_ref, rtol=0, atol=0)
    assert not torch.equal(plain_ref, adapter_ref[(4, 16)])
    adapter.mount(unet)
    assert_same_outputs(unet, layout, adapter_ref)
    assert_same_outputs(original, layout, adapter_ref)  # the copy taken before offloading still has GSPN


def test_mounting_onto_a_sequentially_offloaded_unet_is_refused():
    """Its weights are on ``meta``: following them would discard the adapter's weights, and
    processors added after offloading would have no offload hooks."""
    unet = tiny_unet("sd15")
    adapter = GSPNAdapter.from_unet(unet, d_state=4)
    accelerate.cpu_offload(unet, execution_device=CPU)
    with pytest.raises(ValueError, match="mount the GSPN adapter before offloading"):
        adapter.mount(unet)
    assert {p.device.type for p in adapter.parameters()} == {"cpu"}
    assert not gspn_processors(unet) and adapter.mounted_unet is None
    with pytest.raises(ValueError, match="before offloading"):
        GSPNAdapter.from_unet(unet, d_state=4)


def test_model_cpu_offload_equals_the_unoffloaded_unet():
    unet, adapter = mounted("sd15")
    expected = outputs(unet, "sd15", [(4, 16), (16, 8)])
    unet, hook = accelerate.cpu_offload_with_hook(unet, execution_device=CPU)
    assert_same_outputs(unet, "sd15", expected)
    hook.offload()
    assert_same_outputs(unet, "sd15", expected)
    # model offload moves whole modules: mounting after it works as well
    adapter.unmount()
    adapter.mount(unet)
    assert_same_outputs(unet, "sd15", expected)


@pytest.mark.parametrize("how", ["disk_offload", "dispatch_model"])
def test_disk_offload_equals_the_unoffloaded_unet(how, tmp_path):
    """Weights on disk, loaded per module: the whole UNet (``disk_offload``), or, with a device map,
    some GSPN processors and the mixers of the others (hooks at those modules, not their leaves)."""
    unet, _ = mounted("sd15")
    expected = outputs(unet, "sd15", [(4, 16), (8, 16)])
    if how == "disk_offload":
        accelerate.disk_offload(unet, str(tmp_path), execution_device=CPU)
    else:
        device_map = {"": "cpu"}
        for i, name in enumerate(n for n, _ in unet.named_modules() if n.endswith("attn1.processor")):
            device_map[name if i % 2 else f"{name}.mixer"] = "disk"
        accelerate.dispatch_model(unet, device_map=device_map, main_device="cpu", offload_dir=str(tmp_path))
    assert {p.device.type for proc in gspn_processors(unet) for p in proc.mixer.parameters()} == {"meta"}
    assert_same_outputs(unet, "sd15", expected)


def _pipe_latents(pipe) -> torch.Tensor:
    """Two denoising steps at 16×32 pixels (an 8×16 latent), classifier-free guidance on."""
    return pipe(
        "a red cat",
        height=16,
        width=32,
        num_inference_steps=2,
        guidance_scale=2.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images


def _gspn_pipe(folder: Path):
    pipe = tiny_pipe(folder)
    pipe.set_progress_bar_config(disable=True)
    adapter = GSPNAdapter.from_unet(pipe.unet, d_state=4)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    adapter.mount(pipe)
    return pipe


@pytest.mark.parametrize("mode", ["sequential", "model"])
def test_offloaded_pipeline_equals_the_unoffloaded_one(mode, tmp_path):
    expected = _pipe_latents(_gspn_pipe(tmp_path / "tok"))
    pipe = _gspn_pipe(tmp_path / "tok")
    if mode == "sequential":
        # what pipe.enable_sequential_cpu_offload() does, with the execution device "cpu": diffusers
        # makes it "cpu:0", which accelerate cannot offload to (with or without GSPN)
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                accelerate.cpu_offload(component, CPU, offload_buffers=len(component._parameters) > 0)
        assert {p.device.type for proc in gspn_processors(pipe.unet) for p in proc.parameters()} == {"meta"}
    else:
        pipe.enable_model_cpu_offload(device="cpu")
    latents = _pipe_latents(pipe)
    assert latents.shape == (1, 4, 8, 16)
    torch.testing.assert_close(latents, expected, rtol=0, atol=0)


def test_the_grid_travels_with_each_transformer_call():
    """A transformer called directly, with ``cross_attention_kwargs`` by keyword or by position,
    passes its own grid; the caller's dict is left as it was."""
    unet, _ = mounted("sd15")
    transformer = unet.down_blocks[0].attentions[0]
    proc = transformer.transformer_blocks[0].attn1.processor
    seen = []
    proc.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("hw")), with_kwargs=True)
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 16, 4, 16, generator=gen), torch.randn(2, 5, 16, generator=gen)
    extra = {"gligen": None}
    logged = _DiffusersLog()
    with logged, torch.no_grad():
        by_name = transformer(x, ctx, cross_attention_kwargs=extra, return_dict=False)[0]
        by_position = transformer(x, ctx, None, None, None, extra, return_dict=False)[0]
        forward(unet, "sd15", (8, 12))
    assert seen == [(4, 16), (4, 16), (8, 12)] and extra == {"gligen": None}
    torch.testing.assert_close(by_position, by_name, rtol=0, atol=0)
    # the grid reaches no other processor: diffusers logs a warning for an argument a processor
    # does not take (cross-attention's AttnProcessor2_0 does not take hw)
    assert not [m for m in logged.messages if "hw" in m]


class _DiffusersLog(logging.Handler):
    """Collects what diffusers logs at WARNING and above within a ``with`` block."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> _DiffusersLog:
        logging.getLogger("diffusers").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("diffusers").removeHandler(self)


# ---------------------------------------------------------------------------------------- copies
def _deepcopy(unet):
    return copy.deepcopy(unet)


def _averaged(unet):
    return AveragedModel(unet)


def _pickled(unet):
    buffer = io.BytesIO()
    torch.save(unet, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {"deepcopy": _deepcopy, "AveragedModel": _averaged, "torch.save": _pickled}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("how", list(COPIES))
def test_a_copy_computes_what_the_original_computes(layout, how):
    unet, adapter = mounted(layout)
    expected = outputs(unet, layout)
    clone = COPIES[how](unet)
    assert_same_outputs(clone, layout, expected)
    # the copy has processors of its own: changing or unmounting the original leaves it alone
    inner = clone.module if how == "AveragedModel" else clone
    own = gspn_processors(inner)
    assert len(own) == len(adapter.processors)
    assert not {id(p) for p in own} & {id(p) for p in adapter.processors}
    with torch.no_grad():
        for p in adapter.parameters():
            p.mul_(0.5)
    assert not torch.equal(forward(unet, layout, (4, 16)), expected[(4, 16)])
    adapter.unmount()
    assert not gspn_processors(unet)
    assert_same_outputs(clone, layout, expected)


def test_an_averaged_model_follows_the_averaged_weights():
    """An EMA copy of the UNet computes with the averaged GSPN weights, on its own grids."""
    unet, adapter = mounted("sd15")
    ema = AveragedModel(unet, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.5))
    ema.update_parameters(unet)  # the first update copies the weights
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1)
    ema.update_parameters(unet)
    # the expected EMA weights (0.5 · old + 0.5 · new), loaded into a plain copy of the UNet
    expected_model = copy.deepcopy(unet)
    with torch.no_grad():
        for p in [p for proc in gspn_processors(expected_model) for p in proc.parameters()]:
            p.sub_(0.05)
    for hw in [(4, 16), (16, 8)]:
        args, kwargs = unet_inputs("sd15", *hw)
        with torch.no_grad():
            got = ema(*args, **kwargs).sample
        torch.testing.assert_close(got, forward(expected_model, "sd15", hw), rtol=1e-5, atol=1e-5)


def test_a_copy_with_gradient_checkpointing_gets_the_original_gradients():
    """Several latent sizes (4×16 and 8×8: the same token counts) before one backward, through a
    deep copy whose transformer blocks are recomputed in the backward pass."""
    unet, _ = mounted("sd15")
    clone = copy.deepcopy(unet)
    clone.enable_gradient_checkpointing()
    grads = []
    for model in (unet, clone):
        model.train()
        loss = 0.0
        for i, hw in enumerate([(4, 16), (8, 8), (16, 8)]):
            args, kwargs = unet_inputs("sd15", *hw)
            loss = loss + (i + 1) * model(*args, **kwargs).sample.square().mean()
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any(".processor." in n for n in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def test_a_copy_checks_its_own_layers():
    """Replacing processors in a copy warns about the copy, not the original (and vice versa)."""
    unet, adapter = mounted("sd15")
    expected = forward(unet, "sd15", (8, 12))
    clone = copy.deepcopy(unet)
    clone.set_attn_processor({**clone.attn_processors, adapter.config.layer_names[1]: AttnProcessor2_0()})
    with pytest.warns(UserWarning, match=r"1 of the 4 GSPN processors.*AttnProcessor2_0"):
        forward(clone, "sd15", (8, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(forward(unet, "sd15", (8, 12)), expected, rtol=0, atol=0)
    assert adapter.mounted_unet is unet and adapter.replaced_layers() == []


def test_a_compiled_unet_computes_what_the_original_computes():
    unet, _ = mounted("sd15")
    shapes = [(4, 16), (16, 8)]
    expected = outputs(unet, "sd15", shapes)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(unet, backend="eager", dynamic=False)
        assert_same_outputs(compiled, "sd15", expected)
    finally:
        torch._dynamo.reset()


def test_mounting_an_adapter_on_a_copy_of_a_mounted_unet_says_why_it_is_refused():
    unet, adapter = mounted("sd15")
    copied = copy.deepcopy(unet)
    other = GSPNAdapter.from_unet(tiny_unet("sd15"), d_state=4)
    with pytest.raises(ValueError, match=r"copy of a mounted UNet.*copy the UNet before mounting"):
        other.mount(copied)
    adapter.unmount()
    fresh = copy.deepcopy(unet)  # copied after unmounting: plain attention, free to mount
    other.mount(fresh)
    assert all(isinstance(p, GSPNAttnProcessor) for p in gspn_processors(fresh))
