"""``gspn sample``: class-conditional samples from a checkpoint (a stateless job on the kit's runner).

Example::

    gspn sample --checkpoint runs/dit_digits/last.pt --labels 0-9 --per-label 4 \\
        --steps 100 --sampler ddpm --cfg-scale 3 --seed 0 --output-dir samples/

writes ``OUT/grid.png`` (with ``--per-label > 1`` and at most 10 labels, one column per label;
otherwise ``--nrow`` columns) and ``OUT/NNNN_classY.png`` per image. The same seed gives the same
images. ``--checkpoint`` is a trainer checkpoint (``last.pt``; the EMA weights are used unless
``--no-ema``), an ``ema.safetensors``, or a checkpoint of the reference code (GSPN-DiT training
checkpoint, read through an allow-list; its ``ema`` entry unless ``--no-ema``; the model is inferred
from the tensor shapes or given with ``--model``/``--model-arg``; DiT's 1000-step linear schedule and
SD-VAE latent scale 0.18215). Latent models are decoded with the VAE recorded by
``extract-latents`` or the one given with ``--vae`` (a local folder or hub name); ``--save-latents``
keeps the raw latents instead. ``OUT/summary.json`` lists what was written.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..._validate import check_int, check_number
from ...models import create_model, get_default_cfg, is_model, load_model, read_metadata
from ...training_utils import ConfigError, DistContext, Progress, Recipe, RunConfig, load_ema_weights, load_state
from ...training_utils import run as run_recipe
from .gaussian import SAMPLERS, make_sampling_scheduler, sample_generators, sample_loop

__all__ = [
    "SampleConfig",
    "SampleRecipe",
    "generate",
    "load_for_sampling",
    "parse_labels",
    "run",
    "save_images",
]


def parse_labels(spec: str, num_classes: int) -> list[int]:
    """``"3"``, ``"0,4,7"``, ``"0-9"``, ``"all"`` or ``"null"`` (unconditional) → list of labels.

    Raises:
        ConfigError: (field ``labels``) a part that is no label, an empty list, a label out of range.
    """
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if part == "all":
                out.extend(range(num_classes))
            elif part == "null":
                out.append(num_classes)
            elif "-" in part[1:]:
                a, b = (int(v) for v in part.split("-"))
                if a > b:
                    raise ValueError
                out.extend(range(a, b + 1))
            elif part:
                out.append(int(part))
        except ValueError:
            raise ConfigError(
                "labels", f"must be labels, ranges A-B (A <= B), 'all' or 'null': {part!r} is none of them"
            ) from None
    if not out:
        raise ConfigError("labels", f"must name at least one label, got {spec!r}")
    bad = [v for v in out if not 0 <= v <= num_classes]
    if bad:
        raise ConfigError("labels", f"must be in 0..{num_classes - 1} (or {num_classes} = null): {bad} are outside")
    return out


def generate(
    model: nn.Module,
    schedule: dict[str, Any],
    labels: Sequence[int],
    shape: Sequence[int],
    steps: int = 50,
    sampler: str = "ddim",
    cfg_scale: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: bool = False,
    on_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Sample ``len(labels)`` images ``(N, *shape)``; deterministic for a given ``seed``.

    ``schedule`` holds ``num_train_timesteps``, ``beta_schedule``, ``learn_sigma`` and
    ``clip_sample`` (as written by the trainer). Image ``i`` draws its initial noise and every
    step's noise from its own CPU generator, seeded from ``(seed, i)``
    (:func:`.gaussian.sample_generators`), so with any sampler it is the same image
    whatever ``batch_size`` (up to the floating-point differences of batched kernels).

    ``progress`` shows one bar over every denoising step of every batch; ``on_step`` is called after each
    (a caller's own progress report).
    """
    was_training = model.training
    model.eval()
    chunks = []
    starts = range(0, len(labels), batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(starts) * steps, desc="sampling", leave=False, dynamic_ncols=True)

    def tick() -> None:
        if bar is not None:
            bar.update(1)
        if on_step is not None:
            on_step()

    try:
        for i in starts:
            scheduler = make_sampling_scheduler(sampler, **schedule)
            chunks.append(
                sample_loop(
                    model,
                    scheduler,
                    list(labels[i : i + batch_size]),
                    shape,
                    steps,
                    cfg_scale,
                    sample_generators(seed, len(labels[i : i + batch_size]), start=i),
                    device,
                    on_step=tick,
                ).cpu()
            )
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return torch.cat(chunks)


def save_images(
    images: torch.Tensor,
    grid_path: str | os.PathLike,
    nrow: int = 10,
    individual_dir: str | os.PathLike | None = None,
    labels: Sequence[int] | None = None,
    upscale: int = 1,
) -> Path:
    """Write ``images`` (``(N, 1 or 3, H, W)`` in ``[-1, 1]``) as a PNG grid, and optionally one PNG each.

    Individual files are ``individual_dir/NNNN_classY.png``; ``upscale`` enlarges by pixel repetition.
    """
    from PIL import Image

    imgs = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if upscale > 1:
        imgs = imgs.repeat_interleave(upscale, dim=2).repeat_interleave(upscale, dim=3)
    n, c, h, w = imgs.shape
    nrow = max(1, min(nrow, n))
    rows = math.ceil(n / nrow)
    pad = 2
    grid = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[
            :,
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + col * (w + pad) : pad + col * (w + pad) + w,
        ] = imgs[i]

    def to_pil(t: torch.Tensor) -> Image.Image:
        arr = t.permute(1, 2, 0).numpy()
        return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else np.ascontiguousarray(arr))

    grid_path = Path(grid_path)
    grid_path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(grid).save(grid_path)
    if individual_dir is not None:
        d = Path(individual_dir)
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            tag = f"_class{labels[i]}" if labels is not None else ""
            to_pil(imgs[i]).save(d / f"{i:04d}{tag}.png")
    return grid_path


def _is_reference_generator(path: Path) -> bool:
    """Whether ``path`` is a checkpoint of the reference code's generator (read through the allow-list)."""
    from ..._pickle import TorchArchive
    from ...models.reference_checkpoints import read_reference_checkpoint

    try:
        with TorchArchive(path) as archive:
            return read_reference_checkpoint(archive).kind == "generator"
    except (ValueError, OSError):  # refused globals (our own trainer files), other layouts, not a zip
        return False


def _load_reference_generator(
    path: Path, use_ema: bool, model_name: str | None, model_args: dict[str, Any]
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """A reference GSPN-DiT checkpoint: the model, DiT's diffusion schedule and its latent setup."""
    from ..._pickle import TorchArchive
    from ...models.reference_checkpoints import infer_reference_model, read_reference_checkpoint

    if model_name is None:
        _, model_name = infer_reference_model(path)
    model = create_model(
        model_name, pretrained=os.fspath(path), pretrained_entry="ema" if use_ema else "model", **model_args
    )
    with TorchArchive(path) as archive:
        config = read_reference_checkpoint(archive).config
    schedule = {"num_train_timesteps": 1000, "beta_schedule": "linear", "learn_sigma": model.learn_sigma}
    data: dict[str, Any] = {}
    if model.in_channels == 4:  # Stable Diffusion VAE latents, as the reference trains on
        data = {
            "kind": "latents",
            "scaling_factor": 0.18215,
            "shape": [model.in_channels, model.input_size, model.input_size],
        }
        vae = getattr(config, "vae", None)
        if isinstance(vae, str) and vae in ("ema", "mse"):
            data["vae"] = f"stabilityai/sd-vae-ft-{vae}"
    return model, schedule, data


def _require_diffusion_model(name: Any, path: Path) -> None:
    """``ValueError`` unless ``name`` is a registered diffusion model (``gspn sample`` draws images from
    GSPN-DiT weights only; a classifier's file would otherwise fail deep inside with a traceback)."""
    if isinstance(name, str) and is_model(name) and get_default_cfg(name).get("task") == "diffusion":
        return
    what = f"a {name!r} model" if isinstance(name, str) else "no GSPN-DiT"
    raise ValueError(
        f"{path} holds {what}, not a GSPN-DiT: sample from the last.pt or ema.safetensors "
        "of a `gspn train-dit` run (or a reference GSPN-DiT checkpoint)"
    )


def load_for_sampling(
    path: str | os.PathLike,
    use_ema: bool = True,
    device: torch.device | str = "cpu",
    model_name: str | None = None,
    model_args: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Load a model for sampling: ``(model, schedule, data_meta)``.

    ``path`` is a trainer checkpoint (``last.pt``), an ``ema.safetensors``, or a reference GSPN-DiT
    checkpoint (then ``model_name`` — inferred from the shapes when ``None`` — and ``model_args``
    build the model; see :mod:`gspn.models.reference_checkpoints`).
    """
    path = Path(path)
    if path.suffix != ".safetensors" and (model_name is not None or _is_reference_generator(path)):
        model, schedule, data = _load_reference_generator(path, use_ema, model_name, dict(model_args or {}))
        return model.to(device).eval(), schedule, data
    if path.suffix == ".safetensors":
        meta = read_metadata(path)
        if "gspn.architecture" in meta:  # (without it load_model says what is missing)
            _require_diffusion_model(meta["gspn.architecture"], path)
        model = load_model(path)
        extra = json.loads(meta.get("gspn.diffusion", "{}"))
        schedule, data = extra.get("schedule", {}), extra.get("data", {})
    else:
        ckpt = load_state(path)  # the kit's training state (older DiT key names are read too)
        if not isinstance(ckpt, dict) or "schedule" not in ckpt or "data" not in ckpt:
            name = ckpt.get("model_name") if isinstance(ckpt, dict) else None
            _require_diffusion_model(name, path)  # names the classifier a `gspn train` file holds
            raise ValueError(
                f"{path} is not a GSPN-DiT training checkpoint (no diffusion schedule in it); "
                "pass the last.pt or ema.safetensors of a `gspn train-dit` run"
            )
        _require_diffusion_model(ckpt.get("model_name"), path)
        model = create_model(ckpt["model_name"], **ckpt["model_args"])
        if use_ema:
            load_ema_weights(model, ckpt["ema"])
        else:
            model.load_state_dict(ckpt["model"])
        schedule, data = ckpt["schedule"], ckpt["data"]
    if not schedule:
        schedule = {"learn_sigma": getattr(model, "learn_sigma", True)}
    return model.to(device).eval(), schedule, data


@dataclass
class SampleConfig(RunConfig):
    """Everything one ``gspn sample`` call depends on; each field is the ``gspn sample`` flag of its name
    (``gspn sample --help`` documents them; ``model_args`` are the ``--model-arg`` overrides for reference
    checkpoints)."""

    output_dir: str = "samples"
    checkpoint: str = ""
    labels: str = "all"
    per_label: int = 1
    steps: int = 100
    sampler: str = "ddpm"
    cfg_scale: float = 3.0
    image_size: int | Sequence[int] | None = None
    nrow: int = 0
    upscale: int = 1
    batch_size: int = 64
    ema: bool = True
    model: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    vae: str | None = None
    save_latents: bool = False
    fid_extractor: str | None = None
    fid_ref: str | None = None
    fid_input_size: int = 299


def _sample_shape(size: int | Sequence[int] | None) -> list[int] | None:
    """``image_size`` as ``[H, W]`` (``None``: the model's training size)."""
    if size is None:
        return None
    size = [size] if isinstance(size, int) else list(size)
    if len(size) not in (1, 2):
        raise ConfigError("image_size", f"must be SIDE or H W, got {size}")
    for v in size:
        check_int("image_size", v)
    return size * (3 - len(size))


class SampleRecipe(Recipe):
    """Sampling as a job of the runner: the model is loaded and every setting checked before the output
    folder is touched; one progress bar over the denoising steps; ``summary.json`` and one closing line."""

    command: ClassVar[str] = "sample"
    stateful: ClassVar[bool] = False
    unit: ClassVar[str] = "job"
    run_files: ClassVar[tuple[str, ...]] = ()  # a new call replaces the images of the last one

    config: SampleConfig

    def check(self) -> None:
        cfg = self.config
        if not cfg.checkpoint:
            raise ConfigError("checkpoint", "is required (a last.pt, an ema.safetensors or a reference checkpoint)")
        for name in ("steps", "per_label", "batch_size", "upscale", "fid_input_size"):
            check_int(name, getattr(cfg, name))
        check_int("nrow", cfg.nrow, minimum=0)
        check_number("cfg_scale", cfg.cfg_scale, 0)
        if cfg.sampler not in SAMPLERS:
            raise ConfigError("sampler", f"must be one of {', '.join(SAMPLERS)}, not {cfg.sampler!r}")
        self.size = _sample_shape(cfg.image_size)
        if cfg.fid_extractor and not cfg.fid_ref:
            raise ConfigError(
                "fid_ref", "is needed with `fid_extractor`: a .npz of mu/sigma, or digits | imagefolder:PATH"
            )
        if not Path(cfg.checkpoint).is_file():
            raise ConfigError("checkpoint", f"{cfg.checkpoint}: no such file")

    def build(self, ctx: DistContext) -> None:
        """The model, its schedule and data setup, the labels and the sample shape (nothing is written)."""
        cfg = self.config
        self.model, self.schedule, self.data = load_for_sampling(
            cfg.checkpoint, cfg.ema, ctx.device, cfg.model, cfg.model_args
        )
        self.labels = [v for v in parse_labels(cfg.labels, self.model.num_classes) for _ in range(cfg.per_label)]
        c = self.model.in_channels
        if self.size is not None:
            self.shape = (c, *self.size)
        elif "shape" in self.data:
            self.shape = tuple(self.data["shape"])
        else:
            self.shape = (c, self.model.input_size, self.model.input_size)
        self.latents = self.data.get("kind") == "latents"
        self.vae = cfg.vae or self.data.get("vae")
        if self.latents and not cfg.save_latents and not self.vae:
            raise ConfigError("vae", "is needed to decode the samples of a latent model (or set `save_latents`)")
        self.result: dict[str, Any] = {}

    def steps_per_unit(self) -> int:
        return math.ceil(len(self.labels) / self.config.batch_size) * self.config.steps

    def header(self) -> str:
        cfg = self.config
        weights = "EMA" if cfg.ema else "raw"
        return (
            f"sample: {type(self.model).__name__} from {cfg.checkpoint} ({weights} weights) | {len(self.labels)} "
            f"images of {'×'.join(map(str, self.shape))}, {cfg.steps} {cfg.sampler} steps, guidance {cfg.cfg_scale:g} "
            f"| {self.ctx.device.type}"
        )

    def run_unit(self, index: int, progress: Progress) -> None:
        cfg, out, labels = self.config, self.out, self.labels

        def on_step() -> None:
            progress.update(1)
            if progress.stop_requested:  # a job has nothing to save: Ctrl-C stops at the next step
                raise KeyboardInterrupt

        imgs = generate(
            self.model,
            self.schedule,
            labels,
            self.shape,
            cfg.steps,
            cfg.sampler,
            cfg.cfg_scale,
            cfg.seed,
            cfg.batch_size,
            self.ctx.device,
            on_step=on_step,
        )
        if self.latents:
            if cfg.save_latents:
                torch.save({"latents": imgs, "labels": torch.tensor(labels)}, out / "latents.pt")
                self.result = {"latents": str(out / "latents.pt"), "images": len(labels), "labels": labels}
                return None
            from .latents import decode_latents

            imgs = decode_latents(self.vae, imgs, float(self.data.get("scaling_factor", 1.0)), device=self.ctx.device)
        distinct = len(dict.fromkeys(labels))
        nrow = cfg.nrow or (min(distinct, 10) if cfg.per_label > 1 else min(len(labels), 10))
        if cfg.per_label > 1 and distinct <= 10:
            # one column per label: reorder label-major → row-major
            order = [i * cfg.per_label + r for r in range(cfg.per_label) for i in range(distinct)]
            imgs, labels = imgs[order], [labels[i] for i in order]
        grid = save_images(imgs, out / "grid.png", nrow, out, labels, cfg.upscale)
        self.result = {"grid": str(grid), "images": len(labels), "labels": labels}
        if cfg.fid_extractor:
            self.result.update(_fid(cfg, imgs))
            (out / "fid.json").write_text(json.dumps({k: v for k, v in self.result.items() if k != "labels"}, indent=2))
        return None

    def export(self, out: Path, finished: bool) -> dict[str, Any]:
        return self.result

    def closing(self, summary: dict[str, Any]) -> str:
        where = summary.get("grid") or summary.get("latents")
        fid = f", FID {summary['fid']:.4g}" if "fid" in summary else ""
        return f"sample: {summary['images']} images → {where}{fid}"


def run(config: SampleConfig) -> dict[str, Any]:
    """Sample as ``config`` says (:func:`gspn.training_utils.run` of :class:`SampleRecipe`); return the
    summary: ``grid`` (or ``latents``), ``images``, ``labels`` and the FID entries if asked for."""
    return run_recipe(SampleRecipe(config))


def _fid(cfg: SampleConfig, imgs: torch.Tensor) -> dict[str, float]:
    """FID/IS of the generated images with the user's extractor (see :mod:`.fid`)."""
    from .data import load_dataset
    from .fid import FeatureExtractor, fid_from_images

    ext = FeatureExtractor.load(cfg.fid_extractor, input_size=cfg.fid_input_size)
    if cfg.fid_ref.endswith(".npz"):
        ref: Any = cfg.fid_ref
    else:
        c, h, _ = imgs.shape[1:]
        ref = load_dataset(cfg.fid_ref, h, c, field="fid_ref")[0].tensors[0]
    return fid_from_images(ext, imgs, ref)
