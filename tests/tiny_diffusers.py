"""Tiny diffusers pipelines shared by the integration, recipe and command tests (no download).

Randomly initialised models built from configs: an SD-1.5-like UNet and an SD-XL-like one
(``transformer_layers_per_block=(1, 2)``, ``addition_embed_type="text_time"``, linear projections), a
tiny VAE (scale factor 2), a tiny CLIP text encoder and a CLIP tokenizer over a 54-token character
vocabulary written here. Importing this module imports diffusers and transformers: test modules
``pytest.importorskip`` them first.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

CROSS_DIM = 16
LAYOUTS = ["sd15", "sdxl"]


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
    """Fixed ``(x, t, text embeddings)`` (and SD-XL's added conditions) for an ``h × w`` latent."""
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


def tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP tokenizer over lower-case letters (its files are written to ``folder``)."""
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


def save_tiny_pipe(folder: Path) -> Path:
    """:func:`tiny_pipe` saved with ``save_pretrained`` to ``folder / "sd"`` (its path is returned)."""
    tiny_pipe(folder / "tok").save_pretrained(folder / "sd")
    return folder / "sd"
