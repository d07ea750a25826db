"""``gspn extract-latents``: encode a dataset with a diffusers ``AutoencoderKL`` for latent training.

Example::

    gspn extract-latents --vae /models/sd-vae-ft-mse --data imagefolder:/data/imagenet_train \\
        --image-size 256 --in-channels 3 --output latents_256.pt
    gspn train-dit --model gspn_dit_b_2 --data latents:latents_256.pt ...

``--vae`` is a local folder (``AutoencoderKL.save_pretrained`` layout) or a hub name (only works
online; nothing is downloaded otherwise). Latents are ``vae.encode(x).latent_dist`` — the mean
with ``--deterministic`` or a seeded sample otherwise — multiplied by the VAE's
``scaling_factor`` (``config.scaling_factor``, override with ``--scaling-factor``). The output
file holds ``latents (N, C, H/8, W/8)`` float32, ``labels (N,)`` and ``meta`` (``vae``,
``scaling_factor``, ``num_classes``, image size).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .._files import atomic_torch_save
from .data import load_dataset

__all__ = [
    "decode_latents",
    "encode_dataset",
    "load_vae",
    "run_extract_latents",
]


def load_vae(name_or_path: str | os.PathLike | Any, device: torch.device | str = "cpu") -> Any:
    """An ``AutoencoderKL`` from a local folder or hub name (or pass a built instance through)."""
    from diffusers import AutoencoderKL

    if isinstance(name_or_path, AutoencoderKL):
        return name_or_path.to(device).eval()
    return AutoencoderKL.from_pretrained(str(name_or_path)).to(device).eval()


@torch.no_grad()
def encode_dataset(
    vae: Any,
    images: torch.Tensor,
    batch_size: int = 32,
    deterministic: bool = False,
    seed: int = 0,
    scaling_factor: float | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Encode ``images (N, C, H, W)`` in ``[-1, 1]`` → scaled latents ``(N, c, H/f, W/f)`` (float32, CPU)."""
    device = next(vae.parameters()).device
    scale = float(vae.config.scaling_factor if scaling_factor is None else scaling_factor)
    gen = torch.Generator().manual_seed(seed)
    it = range(0, len(images), batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="encode")
    out = []
    for i in it:
        dist = vae.encode(images[i : i + batch_size].to(device)).latent_dist
        if deterministic:
            z = dist.mean
        else:
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(device)
        out.append((z * scale).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def decode_latents(
    vae: Any,
    latents: torch.Tensor,
    scaling_factor: float,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Scaled latents → images ``(N, C, H, W)`` in ``[-1, 1]`` (float32, CPU)."""
    vae = load_vae(vae, device)
    dev = next(vae.parameters()).device
    out = [
        vae.decode(latents[i : i + batch_size].to(dev) / scaling_factor).sample.float().clamp(-1, 1).cpu()
        for i in range(0, len(latents), batch_size)
    ]
    return torch.cat(out)


def run_extract_latents(args: Any) -> dict[str, Any]:
    """Run ``extract-latents``; returns the output path, latent shape and count."""
    from .._files import check_output_file
    from .._validate import check_int

    for name in ("image_size", "batch_size"):
        check_int(name, getattr(args, name))
    check_int("limit", args.limit, minimum=0)
    check_int("threads", getattr(args, "threads", 0), minimum=0)
    check_output_file(args.output)
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    if args.data.startswith("latents:"):
        raise ValueError("--data must be pixel data (digits or imagefolder:PATH)")
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    dataset, meta = load_dataset(args.data, args.image_size, args.in_channels)
    x, y = dataset.tensors
    if args.limit:
        x, y = x[: args.limit], y[: args.limit]
    vae = load_vae(args.vae, device)
    if x.shape[1] != vae.config.in_channels:
        raise ValueError(
            f"the VAE expects {vae.config.in_channels} channels; use --in-channels {vae.config.in_channels}"
        )
    scale = float(vae.config.scaling_factor if args.scaling_factor is None else args.scaling_factor)
    z = encode_dataset(vae, x, args.batch_size, args.deterministic, args.seed, scale, args.progress)
    info = {
        "vae": os.path.abspath(args.vae) if Path(args.vae).exists() else str(args.vae),
        "scaling_factor": scale,
        "num_classes": meta["num_classes"],
        "image_size": args.image_size,
        "channels": args.in_channels,
        "source": args.data,
    }
    atomic_torch_save({"latents": z, "labels": y.clone(), "meta": info}, Path(args.output))
    return {"out": str(args.output), "count": len(z), "shape": list(z.shape[1:]), **info}


if __name__ == "__main__":  # deprecated spelling of ``gspn extract-latents`` (the command package owns the flags)
    import sys

    from ..commands import main as _main

    sys.exit(_main(["extract-latents", *sys.argv[1:]]))
