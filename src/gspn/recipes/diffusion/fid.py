"""FID / Inception Score hook with *user-provided* feature-extractor weights (no download).

Nothing here fetches weights. Give a feature extractor as

* a file: an exported program ``*.pt2`` (``torch.export.save``) or TorchScript (``torch.jit.save``),
  e.g. an Inception-v3 exported on a machine that has it, or
* any ``nn.Module`` / callable in Python.

It must map images ``(B, 3, H, W)`` in ``[0, 1]`` to either pooled features ``(B, F)`` or a tuple
``(features (B, F), logits (B, K))``; logits enable the Inception Score. The images are resized to
``input_size`` (299 for Inception) with bilinear interpolation and grey images repeated to 3
channels. Reference statistics are a ``.npz`` with ``mu`` and ``sigma`` (the ADM/pytorch-fid
convention) or are computed from a tensor of real images.

    >>> ext = FeatureExtractor.load("inception_ts.pt", input_size=299)   # doctest: +SKIP
    >>> fid_from_images(ext, fake_images, real_images)                   # doctest: +SKIP

**The numbers are only comparable with published FIDs when the extractor is the standard
TF-ported Inception (pt_inception-2015-12-05) and 50K samples are used.**
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "FeatureExtractor",
    "fid_from_features",
    "fid_from_images",
    "frechet_distance",
    "inception_score",
    "load_stats",
    "save_stats",
]


class FeatureExtractor:
    """Wrap a user-supplied network: images in ``[-1, 1]`` → ``(features, logits or None)``."""

    def __init__(
        self,
        net: Callable[[torch.Tensor], Any],
        input_size: int | None = 299,
        device: torch.device | str = "cpu",
        batch_size: int = 64,
    ) -> None:
        self.net = net
        self.input_size = input_size
        self.device = torch.device(device)
        self.batch_size = batch_size

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs: Any) -> FeatureExtractor:
        """Load an extractor from a local ``.pt2`` (torch.export) or TorchScript file (never downloads)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"feature extractor {str(path)!r} not found (weights are never downloaded)")
        if path.suffix == ".pt2":  # torch.export.save(...) of an exported program
            net = torch.export.load(str(path)).module()
        else:  # TorchScript (torch.jit.save)
            net = torch.jit.load(str(path), map_location=kwargs.get("device", "cpu")).eval()
        return cls(net, **kwargs)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``images (N, 1|3, H, W)`` in ``[-1, 1]`` → ``(features (N, F), logits (N, K) | None)`` f64."""
        feats, logits = [], []
        for i in range(0, len(images), self.batch_size):
            x = (images[i : i + self.batch_size].float().to(self.device) + 1) / 2
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            if self.input_size and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
                x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
            out = self.net(x)
            f, lg = out if isinstance(out, (tuple, list)) else (out, None)
            feats.append(f.reshape(len(x), -1).double().cpu())
            if lg is not None:
                logits.append(lg.reshape(len(x), -1).double().cpu())
        return torch.cat(feats), (torch.cat(logits) if logits else None)


def _stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½)``."""
    # tr (Σ1 Σ2)^½ = Σ_i √λ_i(Σ1 Σ2); the eigenvalues are real and ≥ 0 (Σ1 Σ2 is similar to a PSD matrix)
    eig = np.linalg.eigvals(sigma1 @ sigma2).real.clip(min=0.0)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.sqrt(eig).sum())


def fid_from_features(
    fake: torch.Tensor | np.ndarray, real: torch.Tensor | np.ndarray | tuple[np.ndarray, np.ndarray]
) -> float:
    """FID between feature sets; ``real`` may be features or precomputed ``(mu, sigma)``."""
    mu_r, sig_r = real if isinstance(real, tuple) else _stats(real)
    return frechet_distance(*_stats(fake), mu_r, sig_r)


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) ‖ p(y)))`` from logits: mean and std over ``splits``."""
    p = torch.softmax(logits.double(), dim=1)
    scores = []
    for chunk in p.chunk(splits):
        py = chunk.mean(dim=0, keepdim=True)
        kl = (chunk * (torch.log(chunk + 1e-12) - torch.log(py + 1e-12))).sum(dim=1).mean()
        scores.append(float(torch.exp(kl)))
    return float(np.mean(scores)), float(np.std(scores))


def save_stats(features: torch.Tensor | np.ndarray, path: str | os.PathLike) -> None:
    """Save ``mu``/``sigma`` of ``features`` to a ``.npz`` (reference statistics)."""
    mu, sigma = _stats(features)
    np.savez(path, mu=mu, sigma=sigma)


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` from a ``.npz`` with those keys."""
    with np.load(path) as f:
        return f["mu"], f["sigma"]


def fid_from_images(
    extractor: FeatureExtractor,
    fake: torch.Tensor,
    real: torch.Tensor | str | os.PathLike,
    is_splits: int = 10,
) -> dict[str, float]:
    """FID (and IS when the extractor gives logits) of ``fake`` vs ``real`` images or a stats file."""
    f_fake, logits = extractor(fake)
    ref = load_stats(real) if isinstance(real, (str, os.PathLike)) else _stats(extractor(real)[0])
    out = {"fid": fid_from_features(f_fake, ref)}
    if logits is not None:
        out["is_mean"], out["is_std"] = inception_score(logits, min(is_splits, len(logits)))
    return out
