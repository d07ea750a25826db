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

The recipe's entry point is :func:`run` of an :class:`ExtractLatentsConfig`, a stateless job of the kit's
runner: everything is checked and the VAE loaded before the file is written; one progress bar over the
VAE batches; one closing line.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..._files import atomic_torch_save, check_output_file
from ..._validate import check_int, check_number
from ...training_utils import ConfigError, DistContext, Progress, Recipe, RunConfig
from ...training_utils import run as run_recipe
from .data import load_dataset

__all__ = [
    "ExtractLatentsConfig",
    "ExtractLatentsRecipe",
    "check_config",
    "decode_latents",
    "encode_dataset",
    "load_vae",
    "run",
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
    on_batch: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Encode ``images (N, C, H, W)`` in ``[-1, 1]`` → scaled latents ``(N, c, H/f, W/f)`` (float32, CPU).

    ``progress`` shows a bar over the batches; ``on_batch`` is called after each (a caller's own report)."""
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
        if on_batch is not None:
            on_batch()
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
class ExtractLatentsConfig(RunConfig):
    """Everything one ``gspn extract-latents`` call depends on; each field is the ``gspn extract-latents``
    flag of its name (``gspn extract-latents --help`` documents them). The product is the file ``output``;
    ``output_dir`` is not used."""

    vae: str = ""  # AutoencoderKL folder or hub name (required)
    output: str = ""  # the .pt file to write (required)
    data: str = "digits"  # digits | imagefolder:PATH
    image_size: int = 256
    in_channels: int = 3
    batch_size: int = 32
    deterministic: bool = False
    scaling_factor: float | None = None
    limit: int = 0  # encode only the first N images (0 = all)


def check_config(cfg: ExtractLatentsConfig) -> None:
    """Reject settings that cannot run, before any work: one :class:`ConfigError` naming the field."""
    if not cfg.vae:
        raise ConfigError("vae", "is required (an AutoencoderKL folder or hub name)")
    if not cfg.output:
        raise ConfigError("output", "is required (the .pt file to write)")
    for name in ("image_size", "batch_size"):
        check_int(name, getattr(cfg, name))
    check_int("limit", cfg.limit, minimum=0)
    if cfg.in_channels not in (1, 3):
        raise ConfigError("in_channels", f"must be 1 or 3, got {cfg.in_channels!r}")
    check_number("scaling_factor", cfg.scaling_factor, 0, lo_open=True, allow_none=True)
    if cfg.data.startswith("latents:"):
        raise ConfigError("data", "must be pixel data (digits or imagefolder:PATH)")
    check_output_file(cfg.output)
    vae = os.fspath(cfg.vae)
    if not Path(vae).expanduser().exists() and (vae.startswith(("/", ".", "~")) or vae.count("/") > 1 or "\\" in vae):
        # a local path (a hub name is "org/name"): else diffusers says "check your internet connection"
        raise ConfigError("vae", f"{vae}: no such folder")


class ExtractLatentsRecipe(Recipe):
    """Latent extraction as a job of the runner: the data and the VAE are loaded (and their channels
    matched) before anything is written; the latents file is written atomically at the end."""

    command: ClassVar[str] = "extract-latents"
    stateful: ClassVar[bool] = False
    unit: ClassVar[str] = "job"
    writes_folder: ClassVar[bool] = False  # the product is the one file ``output``

    config: ExtractLatentsConfig

    def check(self) -> None:
        check_config(self.config)

    def build(self, ctx: DistContext) -> None:
        cfg = self.config
        dataset, self.meta = load_dataset(cfg.data, cfg.image_size, cfg.in_channels)
        self.x, self.y = dataset.tensors
        if cfg.limit:
            self.x, self.y = self.x[: cfg.limit], self.y[: cfg.limit]
        self.vae = load_vae(cfg.vae, ctx.device)
        if self.x.shape[1] != self.vae.config.in_channels:
            raise ConfigError("in_channels", f"must be {self.vae.config.in_channels} for this VAE")
        self.scale = float(self.vae.config.scaling_factor if cfg.scaling_factor is None else cfg.scaling_factor)
        self.result: dict[str, Any] = {}

    def steps_per_unit(self) -> int:
        return -(-len(self.x) // self.config.batch_size)

    def header(self) -> str:
        cfg = self.config
        return (
            f"extract-latents: {len(self.x)} images of {cfg.data} ({cfg.in_channels}×{cfg.image_size}²) through "
            f"{cfg.vae} (scale {self.scale:g}) | {self.ctx.device.type}"
        )

    def run_unit(self, index: int, progress: Progress) -> None:
        cfg = self.config

        def on_batch() -> None:
            progress.update(1)
            if progress.stop_requested:  # a job has nothing to save: Ctrl-C stops at the next batch
                raise KeyboardInterrupt

        z = encode_dataset(self.vae, self.x, cfg.batch_size, cfg.deterministic, cfg.seed, self.scale, on_batch=on_batch)
        info = {
            "vae": os.path.abspath(cfg.vae) if Path(cfg.vae).exists() else str(cfg.vae),
            "scaling_factor": self.scale,
            "num_classes": self.meta["num_classes"],
            "image_size": cfg.image_size,
            "channels": cfg.in_channels,
            "source": cfg.data,
        }
        atomic_torch_save({"latents": z, "labels": self.y.clone(), "meta": info}, Path(cfg.output))
        self.result = {"out": str(cfg.output), "count": len(z), "shape": list(z.shape[1:]), **info}

    def export(self, out: Path, finished: bool) -> dict[str, Any]:
        return self.result

    def closing(self, summary: dict[str, Any]) -> str:
        shape = "×".join(map(str, summary["shape"]))
        return f"extract-latents: {summary['count']} latents of {shape} → {summary['out']}"


def run(config: ExtractLatentsConfig) -> dict[str, Any]:
    """Encode ``config.data`` with ``config.vae`` and write the latents file (``gspn extract-latents``).

    Returns the output path, latent count and shape, and the stored metadata (absolute VAE path for a
    local folder, scaling factor, classes, image size, channels, source). Raises ``TypeError`` for a
    config of another type and :class:`ConfigError` for settings that cannot run (:func:`check_config`) or a
    VAE whose input channels differ from ``in_channels``.
    """
    if not isinstance(config, ExtractLatentsConfig):
        raise TypeError(f"config must be an ExtractLatentsConfig, got {type(config).__name__}")
    return run_recipe(ExtractLatentsRecipe(config))
