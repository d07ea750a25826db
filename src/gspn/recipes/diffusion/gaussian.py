"""Diffusion maths on top of diffusers' schedulers: the training loss and the sampling loop.

* **Noise schedule and forward process**: :class:`diffusers.DDPMScheduler` (1000 steps, linear
  betas 1e-4 → 0.02, as in DDPM/ADM/DiT). ``x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε`` is
  ``scheduler.add_noise``.
* **Objective.** ``L = L_simple + L_vlb`` where ``L_simple = mean ‖ε − ε_θ(x_t, t, y)‖²``.
  With ``learn_sigma`` the model also outputs ``v ∈ [−1, 1]`` (per element) and the reverse
  variance is ``σ²_t = exp(f log β_t + (1 − f) log β̃_t)``, ``f = (v + 1)/2`` — diffusers'
  ``variance_type="learned_range"``, so the sampler uses exactly the variance trained here.
  ``L_vlb`` is the IDDPM variational term that trains ``v`` only (the mean is built from a
  *detached* ε, so ``L_simple`` alone trains the mean)::

      L_vlb = KL( N(μ̃_t(x_0, x_t), β̃_t) ‖ N(μ_θ(x_t, sg[ε_θ]), σ²_t) ) / log 2    (bits/dim)

  averaged over dimensions, weight 1 (equivalent to IDDPM's λ = 0.001 with T = 1000 under
  uniform t). **Documented simplification:** at ``t = 0`` IDDPM uses the discretised Gaussian
  decoder likelihood; here the same KL is used at ``t = 0`` too, with ``β̃_0`` clipped to
  ``β̃_1`` (as for the log-variance), i.e. the decoder is fitted to ``N(x_0, β̃_1)``. Without
  ``learn_sigma`` the loss is ``L_simple`` and the sampler uses the fixed small variance ``β̃_t``.
* **Sampling**: DDPM (``DDPMScheduler``), DDIM (``DDIMScheduler``, η = 0) or DPM-Solver++
  (``DPMSolverMultistepScheduler``, 2nd order), all built on the training schedule, with
  classifier-free guidance via :meth:`gspn.models.GSPNDiT.forward_with_cfg`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "SAMPLERS",
    "diffusion_loss",
    "make_sampling_scheduler",
    "make_train_scheduler",
    "sample_generators",
    "sample_loop",
]

SAMPLERS = ("ddpm", "ddim", "dpm")


def _schedule_kwargs(num_train_timesteps: int, beta_schedule: str) -> dict[str, Any]:
    return {
        "num_train_timesteps": num_train_timesteps,
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "beta_schedule": beta_schedule,
    }


def make_train_scheduler(
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    learn_sigma: bool = True,
    clip_sample: bool = False,
) -> Any:
    """The :class:`diffusers.DDPMScheduler` that defines the forward process (and DDPM sampling)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        **_schedule_kwargs(num_train_timesteps, beta_schedule),
        variance_type="learned_range" if learn_sigma else "fixed_small",
        clip_sample=clip_sample,
    )


def make_sampling_scheduler(
    sampler: str,
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    learn_sigma: bool = True,
    clip_sample: bool = False,
) -> Any:
    """A diffusers scheduler for ``sampler`` in ``("ddpm", "ddim", "dpm")`` on the training schedule."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if sampler == "ddpm":
        return make_train_scheduler(num_train_timesteps, beta_schedule, learn_sigma, clip_sample)
    if sampler == "ddim":
        return DDIMScheduler(
            **_schedule_kwargs(num_train_timesteps, beta_schedule),
            clip_sample=clip_sample,
            set_alpha_to_one=False,
        )
    if sampler == "dpm":
        return DPMSolverMultistepScheduler(
            **_schedule_kwargs(num_train_timesteps, beta_schedule),
            algorithm_type="dpmsolver++",
            solver_order=2,
        )
    raise ValueError(f"unknown sampler {sampler!r}; choose from {SAMPLERS}")


def _gather(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """``values[t]`` reshaped to broadcast over a ``(B, ...)`` tensor of ``ndim`` dims."""
    out = values.to(t.device)[t].float()
    return out.view(-1, *([1] * (ndim - 1)))


def _normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise ``KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2))`` in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def diffusion_loss(
    model: nn.Module,
    scheduler: Any,
    x0: torch.Tensor,
    y: torch.Tensor,
    learn_sigma: bool = True,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """One Monte-Carlo estimate of the training loss (see the module docstring).

    Draws ``t ~ U{0, …, T−1}`` and ``ε ~ N(0, I)`` (from ``generator`` or the global RNG).

    Args:
        model: ``model(x_t, t, y) → (B, C or 2C, H, W)``.
        scheduler: the :func:`make_train_scheduler` schedule.
        x0: clean data ``(B, C, H, W)``.
        y: labels ``(B,)``.
        learn_sigma: whether the model outputs the variance channels (adds ``L_vlb``).

    Returns:
        ``{"loss", "mse", "vb"}`` — scalars; ``loss = mse + vb`` (``vb = 0`` without learned variance).
    """
    b, c = x0.shape[:2]
    num_t = scheduler.config.num_train_timesteps
    t = torch.randint(0, num_t, (b,), generator=generator, device="cpu").to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, device="cpu", dtype=x0.dtype).to(x0.device)
    x_t = scheduler.add_noise(x0, noise, t)
    out = model(x_t, t, y)
    eps = out[:, :c]
    mse = (eps.float() - noise.float()).square().mean()
    if not learn_sigma:
        return {"loss": mse, "mse": mse.detach(), "vb": torch.zeros_like(mse).detach()}
    v = out[:, c:].float()
    acp = scheduler.alphas_cumprod
    acp_prev = torch.cat([acp.new_ones(1), acp[:-1]])
    betas = scheduler.betas
    post_var = betas * (1 - acp_prev) / (1 - acp)
    post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    nd = x0.ndim
    a_t, a_prev, beta_t = _gather(acp, t, nd), _gather(acp_prev, t, nd), _gather(betas, t, nd)
    coef_x0 = beta_t * a_prev.sqrt() / (1 - a_t)
    coef_xt = (1 - a_prev) * (1 - beta_t).sqrt() / (1 - a_t)
    true_mean = coef_x0 * x0.float() + coef_xt * x_t.float()
    true_logvar = _gather(post_logvar, t, nd)
    x0_pred = (x_t.float() - (1 - a_t).sqrt() * eps.detach().float()) / a_t.sqrt()
    model_mean = coef_x0 * x0_pred + coef_xt * x_t.float()
    frac = (v + 1) / 2
    model_logvar = frac * torch.log(beta_t) + (1 - frac) * true_logvar
    vb = _normal_kl(true_mean, true_logvar, model_mean, model_logvar).mean() / math.log(2.0)
    return {"loss": mse + vb, "mse": mse.detach(), "vb": vb.detach()}


def sample_generators(seed: int, count: int, start: int = 0) -> list[torch.Generator]:
    """One CPU generator per sample: sample ``i`` (``start ≤ i < start + count``) of a run with
    ``seed`` gets a generator seeded from ``(seed, i)`` only, so its noise does not depend on the
    batch it is drawn in. Distinct ``(seed, i)`` pairs give independent streams (NumPy's
    ``SeedSequence`` mixes them into the 64-bit seed)."""
    import numpy as np

    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    return [
        torch.Generator().manual_seed(int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint64)[0]))
        for i in range(start, start + count)
    ]


@torch.no_grad()
def sample_loop(
    model: nn.Module,
    scheduler: Any,
    labels: Sequence[int] | torch.Tensor,
    shape: Sequence[int],
    num_steps: int = 50,
    cfg_scale: float = 1.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    on_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Generate ``len(labels)`` samples of ``shape = (C, H, W)`` with a diffusers scheduler.

    The initial noise and every stochastic step draw from ``generator`` (CPU), so a fixed seed
    gives the same images. A list of ``len(labels)`` generators gives each sample its own noise
    (initial and per step), which makes a sample independent of the others in the batch (see
    :func:`sample_generators`). ``cfg_scale > 1`` uses classifier-free guidance; labels equal to
    the model's ``null_label`` give unconditional samples. ``progress`` shows a bar of the denoising
    steps; ``on_step`` is called after each one (a caller's own progress report).

    Returns: ``(N, C, H, W)`` in the data scale (``[-1, 1]`` for images, scaled latents otherwise).

    Raises:
        ValueError: a list of generators whose length is not ``len(labels)``.
    """
    device = torch.device(device)
    y = torch.as_tensor(labels, dtype=torch.long, device=device)
    c = shape[0]
    if isinstance(generator, Sequence):
        generator = list(generator)
        if len(generator) != len(y):
            raise ValueError(f"got {len(generator)} generators for {len(y)} samples: give one per sample")
        x = torch.cat([torch.randn((1, *shape), generator=g, device="cpu") for g in generator]).to(device)
    else:
        x = torch.randn((len(y), *shape), generator=generator, device="cpu").to(device)
    scheduler.set_timesteps(num_steps)
    x = x * scheduler.init_noise_sigma
    learned = getattr(scheduler.config, "variance_type", None) == "learned_range"
    steps = scheduler.timesteps
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="sampling", leave=False)
    for t in steps:
        model_in = scheduler.scale_model_input(x, t)
        tt = torch.full((len(y),), int(t), device=device, dtype=torch.long)
        out = model.forward_with_cfg(model_in, tt, y, cfg_scale)
        if not (learned and out.shape[1] == 2 * c):
            out = out[:, :c]
        kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
        if on_step is not None:
            on_step()
    return x
