"""GSPN in diffusers UNets: swap, shapes, save/load, distillation, high-resolution generation.

Everything runs on tiny, randomly initialised models built here from configs (no download):
an SD-1.5-like UNet and an SD-XL-like one (``transformer_layers_per_block=(1, 2)``,
``addition_embed_type="text_time"``, linear projections), a tiny VAE, a tiny CLIP text encoder
and a CLIP tokenizer over a 54-token character vocabulary written by the test.
"""

from __future__ import annotations

import copy
import json
import string
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from gspn.integrations.diffusers import (
    ChunkedAttnProcessor,
    GSPNAdapter,
    GSPNAttnProcessor,
    find_self_attention,
    swap_self_attention,
)

CROSS_DIM = 16


def tiny_unet(layout: str) -> UNet2DConditionModel:
    """A tiny UNet with the SD-1.5 or the SD-XL layout."""
    torch.manual_seed(0)
    common = dict(
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=CROSS_DIM,
        norm_num_groups=8,
        sample_size=8,
    )
    if layout == "sd15":
        return UNet2DConditionModel(
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=4,
            **common,
        )
    return UNet2DConditionModel(  # SD-XL: text_time conditioning, deeper transformers, linear proj
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 * 4 + CROSS_DIM,
        **common,
    )


def unet_inputs(layout: str, h: int, w: int, batch: int = 2) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, h, w, generator=g)
    t = torch.tensor([10, 700][:batch])
    emb = torch.randn(batch, 5, CROSS_DIM, generator=g)
    kwargs = {}
    if layout == "sdxl":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, CROSS_DIM, generator=g),
            "time_ids": torch.tensor([[8.0 * h, 8.0 * w, 0, 0, 8.0 * h, 8.0 * w]]).expand(batch, -1),
        }
    return (x, t, emb), kwargs


def run(unet, layout, h, w, **extra):
    args, kwargs = unet_inputs(layout, h, w)
    with torch.no_grad():
        return unet(*args, **kwargs, **extra).sample


def tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for tok in [*string.ascii_lowercase, *(c + "</w>" for c in string.ascii_lowercase)]:
        vocab[tok] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=12)


def tiny_pipe(folder: Path) -> StableDiffusionPipeline:
    """A complete SD-1.5-like pipeline of tiny random components (VAE scale factor 2)."""
    tok = tiny_tokenizer(folder)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok.get_vocab()),
            hidden_size=CROSS_DIM,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=12,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=tiny_unet("sd15"),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.fixture(scope="module")
def saved_pipe(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pipe")
    tiny_pipe(folder / "tok").save_pretrained(folder / "sd")
    return folder / "sd"


LAYOUTS = ["sd15", "sdxl"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: on a loaded machine several OpenMP threads per op cost far more in
    synchronisation than they gain (x50 measured on 2 shared cores), so run them single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


# ---------------------------------------------------------------------------------------- distillation
def _distiller(tmp_path: Path, out: str, steps: int, **kw):
    from gspn.distill.data import load_captions
    from gspn.distill.trainer import DistillConfig, Distiller

    caps = tmp_path / "captions.txt"
    caps.write_text("a red cat\na blue dog\n# comment\ngreen tree\n")
    cfg = DistillConfig(
        captions=str(caps),
        output_dir=str(tmp_path / out),
        resolution=16,
        batch_size=2,
        steps=steps,
        lr=5e-3,
        save_every=0,
        log_every=100,
        gspn={"d_state": 4},
        **kw,
    )
    return Distiller(cfg, pipe=tiny_pipe(tmp_path / "tok"), data=load_captions(caps))


def test_distillation_lowers_the_loss_and_resumes_exactly(tmp_path):
    ref = _distiller(tmp_path, "a", steps=4)
    batches = [ref.make_batch(10_000 + i) for i in range(2)]

    def eval_loss(d):
        with torch.no_grad():
            return sum(d.compute_loss(b)[0].item() for b in batches)

    before = eval_loss(ref)
    history = ref.train(log=None)
    assert len(history) == 4 and set(history[0]) >= {"output", "feature", "loss"}
    assert "noise" not in history[0]  # caption file only: no ground-truth noise term
    assert eval_loss(ref) < 0.9 * before
    assert (tmp_path / "a" / "checkpoint.pt").is_file()
    assert (tmp_path / "a" / "adapter" / "config.json").is_file()
    # only the GSPN parameters trained: the UNet's own weights are untouched
    pristine = tiny_unet("sd15").state_dict()
    own = {k: v for k, v in ref.unet.state_dict().items() if ".processor." not in k}
    assert own.keys() == pristine.keys() and all(torch.equal(own[k], pristine[k]) for k in own)

    first = _distiller(tmp_path, "b", steps=2)
    first.train(log=None)
    resumed = _distiller(tmp_path, "b", steps=4)
    logs = []
    resumed.train(log=logs.append)
    assert any("resumed" in line and "step 2" in line for line in logs)
    a, b = ref.adapter.state_dict(), resumed.adapter.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_distill_refuses_a_run_without_loss_terms(tmp_path):
    with pytest.raises(ValueError, match="every loss term is off"):
        _distiller(tmp_path, "none", steps=1, output_weight=0.0, feature_weight=0.0)


def test_distill_train_all_uses_a_frozen_copy_as_teacher(tmp_path):
    d = _distiller(tmp_path, "all", steps=1, train_all=True)
    before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    conv = d.unet.conv_in.weight.detach().clone()
    history = d.train(log=None)
    assert {"output", "feature"} <= history[0].keys()
    assert not torch.equal(d.unet.conv_in.weight, conv)  # the whole student trains
    assert all(torch.equal(v, before[k]) for k, v in d.teacher.state_dict().items())


def test_distill_cli_on_image_folder(saved_pipe, tmp_path, capsys):
    from PIL import Image

    from gspn.cli import main

    folder = tmp_path / "images"
    folder.mkdir()
    for i, color in enumerate(["red", "blue"]):
        Image.new("RGB", (20, 24), color=color).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {color} square")
    out = tmp_path / "run"
    rc = main(
        [
            "distill",
            "--model",
            str(saved_pipe),
            "--captions",
            str(folder),
            "--output-dir",
            str(out),
            "--image-size",
            "16",
            "--steps",
            "2",
            "--d-state",
            "4",
            "--chunk-size",
            "2",
            "--gradient-checkpointing",
            "--caption-dropout",
            "0.5",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 2 and summary["noise"] > 0  # images: the ground-truth noise term is on
    adapter = GSPNAdapter.from_pretrained(out / "adapter")
    assert adapter.config.chunk_size == 2
    # continue from the saved adapter in a new run
    rc = main(
        [
            "distill",
            "--model",
            str(saved_pipe),
            "--captions",
            str(folder),
            "--output-dir",
            str(tmp_path / "run2"),
            "--init-adapter",
            str(out / "adapter"),
            "--image-size",
            "16",
            "--steps",
            "1",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0 and GSPNAdapter.from_pretrained(tmp_path / "run2" / "adapter").config.chunk_size == 2
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["config"]["gradient_checkpointing"] and state["config"]["captions"] == str(folder)
    assert state["step"] == 2 and {"optimizer", "scheduler", "rng", "model", "format"} <= state.keys()


# ---------------------------------------------------------------------------------------- generation
def test_non_square_high_resolution_generation_end_to_end(tmp_path):
    from gspn.integrations.generate import generate, prepare_pipeline

    pipe = tiny_pipe(tmp_path / "tok")
    adapter = GSPNAdapter.from_unet(pipe.unet, d_state=4)
    prepare_pipeline(pipe, adapter, cross_attention_chunk=64)
    assert pipe.vae.use_tiling
    procs = pipe.unet.attn_processors
    assert sum(isinstance(p, GSPNAttnProcessor) for p in procs.values()) == 4
    assert sum(isinstance(p, ChunkedAttnProcessor) for p in procs.values()) == 4
    # a UNet configured for 8×8 latents; 40×72 pixels = 20×36 latents (non-square, 11× the
    # positions), decoded by the VAE in tiles (of 16 latents)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (image,) = generate(pipe, "a red cat", height=40, width=72, steps=2, guidance=2.0, seed=0)
        assert image.size == (72, 40)
        (up,) = generate(
            pipe, "a red cat", height=48, width=64, steps=2, guidance=2.0, upscale_from=(16, 24), strength=0.5
        )
        assert up.size == (64, 48)
        (up,) = generate(
            pipe,
            "a red cat",
            height=64,
            width=96,
            steps=2,
            guidance=2.0,
            upscale_from=[(16, 24), (32, 48)],
            strength=0.5,
        )
        assert up.size == (96, 64)
        # DemoFusion-style skip residuals change the refinement but not the shapes
        kw = dict(height=32, width=48, steps=4, guidance=2.0, upscale_from=(16, 24), strength=0.8, output_type="latent")
        plain = generate(pipe, "a red cat", **kw)
        blended = generate(pipe, "a red cat", skip_residual=3.0, **kw)
    assert plain.shape == blended.shape == (1, 4, 16, 24)
    assert not torch.allclose(plain, blended)


def test_generate_cli(saved_pipe, tmp_path):
    from gspn.commands import main as cli_main

    def main(argv):
        return cli_main(["generate", *argv])

    unet = UNet2DConditionModel.from_pretrained(saved_pipe, subfolder="unet")
    GSPNAdapter.from_unet(unet, d_state=4).save_pretrained(tmp_path / "adapter")
    out = tmp_path / "img.png"
    rc = main(
        [
            "--prompt",
            "a blue dog",
            "--height",
            "40",
            "--width",
            "72",
            "--steps",
            "2",
            "--model",
            str(saved_pipe),
            "--adapter",
            str(tmp_path / "adapter"),
            "--output",
            str(out),
            "--upscale-from",
            "16x32",
            "--strength",
            "0.5",
            "--skip-residual",
            "3",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    from PIL import Image

    with Image.open(out) as im:
        assert im.size == (72, 40)


def test_distill_under_torchrun_two_processes(saved_pipe, tmp_path):
    """Two CPU processes (gloo): gradients averaged by DDP, rank 0 writes the checkpoint."""
    import os
    import subprocess
    import sys

    caps = tmp_path / "captions.txt"
    caps.write_text("a red cat\na blue dog\n")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "gspn.distill",
        "--model",
        str(saved_pipe),
        "--captions",
        str(caps),
        "--output-dir",
        str(out),
        "--image-size",
        "16",
        "--steps",
        "2",
        "--d-state",
        "4",
        "--device",
        "cpu",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 2


def test_distillation_with_an_sdxl_pipeline(tmp_path):
    """SD-XL: two text encoders, pooled `text_embeds` and `time_ids` added conditions."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    from gspn.distill.data import CaptionData
    from gspn.distill.trainer import DistillConfig, Distiller

    base = tiny_pipe(tmp_path / "tok")
    tok = base.tokenizer
    cfg = dict(
        vocab_size=len(tok.get_vocab()),
        hidden_size=CROSS_DIM // 2,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=12,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    pipe = StableDiffusionXLPipeline(
        vae=base.vae,
        text_encoder=CLIPTextModel(CLIPTextConfig(**cfg)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**cfg, projection_dim=CROSS_DIM)),
        tokenizer=tok,
        tokenizer_2=tok,
        unet=tiny_unet("sdxl"),
        scheduler=base.scheduler,
    )
    distiller = Distiller(
        DistillConfig(
            output_dir=str(tmp_path / "xl"), resolution=16, batch_size=2, steps=2, save_every=0, gspn={"d_state": 4}
        ),
        pipe=pipe,
        data=CaptionData(["a red cat", "a blue dog"]),
    )
    batch = distiller.make_batch(0)
    assert batch["added"]["text_embeds"].shape == (2, CROSS_DIM)
    assert batch["added"]["time_ids"].shape == (2, 6)
    history = distiller.train(log=None)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert len(distiller.adapter.processors) == 8


def test_unet_swap_benchmark_runs(monkeypatch, capsys):
    import runpy

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "unet_swap.py"
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
