"""High-resolution text-to-image: the pipeline pieces (gspn.integrations.generate) and the ``gspn generate``
job (gspn.recipes.text_to_image) on the runner, with the tiny SD pipeline of ``tests/tiny_diffusers.py``."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from gspn.integrations.diffusers import ChunkedAttnProcessor, GSPNAdapter, GSPNAttnProcessor
from gspn.integrations.generate import generate, prepare_pipeline
from gspn.recipes.text_to_image import GenerateConfig, TextToImageRecipe
from gspn.training_utils import ConfigError
from gspn.training_utils import run as run_recipe
from tiny_diffusers import tiny_pipe


def test_non_square_high_resolution_generation_end_to_end(tmp_path):
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


def _config(tmp_path, name: str, **kw) -> GenerateConfig:
    fields = dict(
        prompt="a red cat",
        height=24,
        width=40,
        steps=2,
        guidance=2.0,
        cross_attn_chunk=64,
        output_dir=str(tmp_path / name),
        device="cpu",
        progress=False,
    )
    fields.update(kw)
    return GenerateConfig(**fields)


def test_the_job_writes_the_image_the_library_makes(tmp_path, capsys):
    cfg = _config(tmp_path, "gen", upscale_from=[(16, 24)], strength=0.5, skip_residual=3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = run_recipe(TextToImageRecipe(cfg, pipe=tiny_pipe(tmp_path / "tok")))
        pipe = prepare_pipeline(tiny_pipe(tmp_path / "tok"), cross_attention_chunk=64)
        (expected,) = generate(
            pipe,
            "a red cat",
            height=24,
            width=40,
            steps=2,
            guidance=2.0,
            upscale_from=[(16, 24)],
            strength=0.5,
            skip_residual=3.0,
        )
    out = tmp_path / "gen"
    from PIL import Image

    with Image.open(out / "image.png") as im:
        assert im.size == (40, 24)
        assert im.tobytes() == expected.tobytes()
    assert summary["images"] == [str(out / "image.png")] and summary["height"] == 24 and summary["width"] == 40
    assert json.loads((out / "summary.json").read_text())["images"] == summary["images"]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("generate 24x40 via 16x24") and lines[1].startswith("generated ")
    # the folder now holds a job: a second one is refused unless told to overwrite
    with pytest.raises(ValueError, match="already holds a run"):
        run_recipe(TextToImageRecipe(cfg, pipe=tiny_pipe(tmp_path / "tok")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_recipe(TextToImageRecipe(_config(tmp_path, "gen", overwrite=True), pipe=tiny_pipe(tmp_path / "tok")))


def test_the_job_counts_every_denoising_step_on_one_bar(tmp_path):
    recipe = TextToImageRecipe(_config(tmp_path, "bar", steps=4, upscale_from=[(16, 24)], strength=0.5))
    assert recipe.steps_per_unit() == 4 + 2
    ticks = []

    class Bar:
        def update(self, n=1, **_):
            ticks.append(n)

    recipe.pipe = tiny_pipe(tmp_path / "tok")
    recipe.out.mkdir()
    from gspn.training_utils import DistContext

    recipe.build(DistContext())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recipe.run_unit(0, Bar())
    assert sum(ticks) == recipe.steps_per_unit()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("prompt", "", "prompt is required"),
        ("strength", 0.0, r"strength must be a finite number in \(0, 1\]"),
        ("height", 0, "height must be an integer >= 1"),
        ("upscale_from", [(16, 0)], "upscale_from must be an integer >= 1"),
        ("cross_attn_chunk", -1, "cross_attn_chunk must be an integer >= 0"),
        ("precision", "half", "precision must be one of auto, fp32, bf16, fp16"),
        ("adapter", "no/such/adapter", "adapter names no saved adapter folder"),
    ],
)
def test_settings_are_checked_before_anything_is_loaded_or_written(tmp_path, field, value, message):
    with pytest.raises(ConfigError, match=message):
        run_recipe(TextToImageRecipe(_config(tmp_path, "bad", **{field: value}), pipe=object()))
    assert not (tmp_path / "bad").exists()
