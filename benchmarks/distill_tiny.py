"""Distillation sanity run on a small random SD-like pipeline (CPU, a few minutes, no download).

Trains the GSPN self-attention of a random UNet to imitate the original softmax attention
(captions only, so the teacher is the only supervision) at one square latent size, and reports the
student's relative error ``MSE(student, teacher) / Var(teacher)`` of the UNet output before and
after training, at the training size and at larger, non-square sizes never seen in training.

    python benchmarks/distill_tiny.py --steps 200

The model is random, so this measures how well GSPN layers can learn to stand in for attention
and whether that transfers across resolutions — not image quality.
"""

from __future__ import annotations

import argparse
import json
import string
import tempfile
import time
from pathlib import Path

import torch


def build_pipe(folder: Path, widths: tuple[int, ...], context: int):
    """A random SD-1.5-like pipeline (VAE scale factor 2) with a character-level CLIP tokenizer."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for tok in [*string.ascii_lowercase, *(c + "</w>" for c in string.ascii_lowercase)]:
        vocab[tok] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=context,
            intermediate_size=2 * context,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    n = len(widths)
    unet = UNet2DConditionModel(
        block_out_channels=widths,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        layers_per_block=1,
        cross_attention_dim=context,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
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
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@torch.no_grad()
def relative_error(distiller, sizes: list[tuple[int, int]], batches: int = 4) -> dict[str, float]:
    """``MSE(student, teacher) / Var(teacher)`` of the UNet output per latent size (fixed inputs)."""
    unet, adapter = distiller.unet, distiller.adapter
    embeds, _ = distiller.encode_prompts(["a red cat", "a blue dog"])
    out = {}
    for h, w in sizes:
        err = var = 0.0
        for i in range(batches):
            g = torch.Generator().manual_seed(1000 + i)
            x = torch.randn(2, 4, h, w, generator=g)
            t = torch.randint(0, 1000, (2,), generator=g)
            student = unet(x, t, embeds).sample
            with adapter.teacher_mode():
                teacher = unet(x, t, embeds).sample
            err += torch.mean((student - teacher) ** 2).item()
            var += teacher.var().item()
        out[f"{h}x{w}"] = err / var
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--image-size", type=int, default=32, help="training pixels (latent = image size / 2)")
    p.add_argument("--eval-sizes", nargs="+", default=["16x16", "24x40", "32x64"], help="latent HxW")
    p.add_argument("--widths", nargs="+", type=int, default=[32, 64])
    p.add_argument("--context", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    from gspn.recipes.unet_distillation import CaptionData, UNetDistillationConfig, UNetDistillationRecipe
    from gspn.training_utils import DistContext, run

    torch.set_num_threads(args.threads)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.eval_sizes]
    colours, objects = ("red", "blue", "green", "black"), ("cat", "dog", "tree", "car")
    captions = [f"a {c} {o}" for c in colours for o in objects]
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipe(Path(tmp), tuple(args.widths), args.context)
        cfg = UNetDistillationConfig(
            output_dir=str(Path(tmp) / "run"),
            image_size=args.image_size,
            batch_size=args.batch_size,
            steps=args.steps,
            lr=args.lr,
            save_every=0,
            log_every=max(1, args.steps // 5),
            warmup_steps=10,
            d_state=8,
            chunk_size=args.chunk_size,
            device="cpu",
            progress=False,
        )
        distiller = UNetDistillationRecipe(cfg, pipe=pipe, data=CaptionData(captions))
        distiller.build(DistContext())  # built first to measure the untrained student
        before = relative_error(distiller, sizes)
        start = time.perf_counter()
        run(distiller)
        seconds = time.perf_counter() - start
        after = relative_error(distiller, sizes)
    side = args.image_size // 2
    print(
        f"trained {args.steps} steps at {side}x{side} latents in {seconds:.0f} s "
        f"({args.steps / seconds:.2f} it/s, {args.threads} thread(s))"
    )
    print(f"{'latent':>8} {'rel. error before':>18} {'after':>8}")
    for key in before:
        print(f"{key:>8} {before[key]:>18.4f} {after[key]:>8.4f}")


if __name__ == "__main__":
    main()
