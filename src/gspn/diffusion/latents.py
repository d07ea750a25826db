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

The recipe's entry point is :func:`run` of an :class:`ExtractLatentsConfig` (no argparse here: the
command package builds the config from the flags).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._files import atomic_torch_save
from .data import load_dataset

__all__ = [
    "ExtractLatentsConfig",
    "decode_latents",
    "encode_dataset",
    "load_vae",
    "run",
    "run_extract_latents",
    "validate",
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


@dataclass
class ExtractLatentsConfig:
    """Everything one ``gspn extract-latents`` call depends on (``gspn extract-latents --help`` documents
    each field; the command builds it with :func:`gspn.commands.diffusion.extract_latents_config`)."""

    vae: str = ""  # AutoencoderKL folder or hub name (required)
    output: str = ""  # the .pt file to write (required)
    data: str = "digits"  # digits | imagefolder:PATH
    image_size: int = 256
    in_channels: int = 3
    batch_size: int = 32
    deterministic: bool = False
    scaling_factor: float | None = None
    limit: int = 0  # encode only the first N images (0 = all)
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    threads: int = 0


def validate(cfg: ExtractLatentsConfig) -> None:
    """Reject nonsense settings before any work: one ``ValueError`` naming the flag (or
    :func:`gspn._files.check_output_file`'s error for an unusable ``output``)."""
    from .._files import check_output_file
    from .._validate import check_int, check_number

    if not cfg.vae:
        raise ValueError("--vae is required (an AutoencoderKL folder or hub name)")
    if not cfg.output:
        raise ValueError("--output is required (the .pt file to write)")
    for name in ("image_size", "batch_size"):
        check_int(name, getattr(cfg, name))
    check_int("limit", cfg.limit, minimum=0)
    check_int("threads", cfg.threads, minimum=0)
    if cfg.in_channels not in (1, 3):
        raise ValueError(f"--in-channels must be 1 or 3, got {cfg.in_channels!r}")
    check_number("scaling_factor", cfg.scaling_factor, 0, lo_open=True, allow_none=True)
    if cfg.data.startswith("latents:"):
        raise ValueError("--data must be pixel data (digits or imagefolder:PATH)")
    check_output_file(cfg.output)
    vae = os.fspath(cfg.vae)
    if not Path(vae).expanduser().exists() and (vae.startswith(("/", ".", "~")) or vae.count("/") > 1 or "\\" in vae):
        # a local path (a hub name is "org/name"): else diffusers says "check your internet connection"
        raise FileNotFoundError(f"--vae {vae}: no such folder")


def run(config: ExtractLatentsConfig) -> dict[str, Any]:
    """Encode ``config.data`` with ``config.vae`` and write the latents file (``gspn extract-latents``).

    Returns the output path, latent count and shape, and the stored metadata (absolute VAE path for a
    local folder, scaling factor, classes, image size, channels, source). Raises ``TypeError`` for a
    config of another type, ``ValueError`` for invalid settings (:func:`validate`) or a VAE whose input
    channels differ from ``in_channels``."""
    if not isinstance(config, ExtractLatentsConfig):
        raise TypeError(
            f"config must be an ExtractLatentsConfig, got {type(config).__name__} (the command line builds it "
            "with gspn.commands.diffusion.extract_latents_config)"
        )
    cfg = config
    validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    dataset, meta = load_dataset(cfg.data, cfg.image_size, cfg.in_channels)
    x, y = dataset.tensors
    if cfg.limit:
        x, y = x[: cfg.limit], y[: cfg.limit]
    vae = load_vae(cfg.vae, device)
    if x.shape[1] != vae.config.in_channels:
        raise ValueError(
            f"the VAE expects {vae.config.in_channels} channels; use --in-channels {vae.config.in_channels}"
        )
    scale = float(vae.config.scaling_factor if cfg.scaling_factor is None else cfg.scaling_factor)
    z = encode_dataset(vae, x, cfg.batch_size, cfg.deterministic, cfg.seed, scale, cfg.progress)
    info = {
        "vae": os.path.abspath(cfg.vae) if Path(cfg.vae).exists() else str(cfg.vae),
        "scaling_factor": scale,
        "num_classes": meta["num_classes"],
        "image_size": cfg.image_size,
        "channels": cfg.in_channels,
        "source": cfg.data,
    }
    atomic_torch_save({"latents": z, "labels": y.clone(), "meta": info}, Path(cfg.output))
    return {"out": str(cfg.output), "count": len(z), "shape": list(z.shape[1:]), **info}


run_extract_latents = run
"""The name of :func:`run` before the recipes took dataclass configs (it took parsed arguments)."""


if __name__ == "__main__":  # deprecated spelling of ``gspn extract-latents`` (the command package owns the flags)
    import sys

    from ..commands import main as _main

    sys.exit(_main(["extract-latents", *sys.argv[1:]]))
