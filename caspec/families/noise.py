"""Where an SDEdit starts, for every family: diffusers' ``strength``, or a noise level matched by signal-to-noise ratio.

``strength`` keeps diffusers' meaning (each family's img2img pipeline rule), which is why the same number means
a far noisier start on FLUX.1 (shifted flow-matching sigmas) than on SD 1.5. ``noise_level`` is family
independent: ``T`` means the signal-to-noise ratio SD 1.x's training schedule (scaled-linear β from 0.00085 to
0.012 over 1000 steps) has at timestep ``round(T × 1000) - 1``, so the paper's ``T = 0.86`` carries over to
every family, SD 1.x included. Noise levels are compared as flow-matching σ (``x_t = (1 - σ) x0 + σ ε``;
a DDPM ᾱ has the σ of the same SNR, ``σ = √(1-ᾱ) / (√ᾱ + √(1-ᾱ))``), and an edit starts at the first sampling
step whose σ is at most the target.

Pure: numpy and the scheduler configs only (planning shows each edit's start step and σ without torch).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

REFERENCE_BETAS = (0.00085, 0.012, 1000)
"""SD 1.x's scaled-linear training schedule: the reference of ``noise_level``."""


def flow_sigma(alpha_bar: Any) -> Any:
    """The flow-matching σ with the same signal-to-noise ratio as a DDPM ``ᾱ``."""
    a = np.sqrt(np.asarray(alpha_bar, dtype=np.float64))
    b = np.sqrt(1.0 - np.asarray(alpha_bar, dtype=np.float64))
    return b / (a + b)


def alphas_cumprod(config: Mapping[str, Any]) -> np.ndarray:
    """ᾱ of a DDPM/DDIM scheduler config (``trained_betas``, ``linear``, ``scaled_linear``, ``squaredcos_cap_v2``)."""
    n = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], dtype=np.float64)
    else:
        start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
        kind = config.get("beta_schedule", "linear")
        if kind == "linear":
            betas = np.linspace(start, end, n, dtype=np.float64)
        elif kind == "scaled_linear":
            betas = np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float64) ** 2
        elif kind == "squaredcos_cap_v2":
            f = [math.cos((t / n + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(n + 1)]
            betas = np.array([min(1 - f[i + 1] / f[i], 0.999) for i in range(n)], dtype=np.float64)
        else:
            raise ValueError(f"beta_schedule {kind!r} is not supported")
    # in float32, as diffusers' schedulers keep them (the σ of late steps then agree to ~1e-7)
    return np.cumprod(1.0 - betas.astype(np.float32), dtype=np.float32).astype(np.float64)


def ddim_timesteps(config: Mapping[str, Any], steps: int) -> np.ndarray:
    """The timesteps ``DDIMScheduler.set_timesteps(steps)`` gives for ``config`` (its ``timestep_spacing``)."""
    n = int(config.get("num_train_timesteps", 1000))
    spacing = config.get("timestep_spacing", "leading")
    if spacing == "linspace":
        return np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)
    if spacing == "trailing":
        return (np.round(np.arange(n, 0, -n / steps)) - 1).astype(np.int64)
    ratio = n // steps
    return (np.arange(0, steps) * ratio).round()[::-1].astype(np.int64) + int(config.get("steps_offset", 0))


def ddim_step_sigmas(config: Mapping[str, Any], steps: int) -> list[float]:
    """The σ (same SNR) at the start of each DDIM sampling step."""
    ac = alphas_cumprod(config)
    t = np.clip(ddim_timesteps(config, steps), 0, len(ac) - 1)
    return [float(s) for s in flow_sigma(ac[t])]


def reference_sigma(noise_level: float) -> float:
    """The σ ``noise_level`` stands for: SD 1.x's SNR at timestep ``round(T × 1000) - 1``."""
    start, end, n = REFERENCE_BETAS
    ac = alphas_cumprod({"beta_start": start, "beta_end": end, "beta_schedule": "scaled_linear",
                         "num_train_timesteps": n})
    t = min(max(int(round(float(noise_level) * n)) - 1, 0), n - 1)
    return float(flow_sigma(ac[t]))


class PureNoiseStart(ValueError):
    """An edit that would start from pure noise (σ = 1): the source image would be thrown away."""


def edit_start(family: Any, configs: Mapping[str, Any], steps: int, resolution: int, *,
               strength: float | None = None, noise_level: float | None = None) -> tuple[int, float]:
    """``(start step, its σ)`` of an edit with ``strength`` (diffusers' rule for ``family``) or ``noise_level``,
    for a model whose ``scheduler`` and ``vae`` configs are ``configs``.

    Raises :class:`PureNoiseStart` when the start is pure noise, and ``ValueError`` when no step would run."""
    sigmas = family.step_sigmas(configs, steps, resolution)
    if noise_level is not None:
        target = reference_sigma(noise_level)
        start = next((i for i, s in enumerate(sigmas) if s <= target + 1e-12), len(sigmas))
    else:
        start = family.strength_start(steps, float(strength if strength is not None else 0.86))
    if start >= steps:
        raise ValueError(f"at {steps} steps this starts after the last step: no denoising step would run")
    sigma = sigmas[start]
    if sigma >= 1.0:
        what = f"noise_level {noise_level}" if noise_level is not None else f"strength {strength}"
        raise PureNoiseStart(f"{what} at {steps} steps starts the edit from pure noise (σ = {sigma:.3f} at step "
                             f"{start}): the source image would be thrown away")
    return start, sigma


def flow_step_sigmas(config: Mapping[str, Any], steps: int, image_tokens: int) -> list[float]:
    """The σ at the start of each step of diffusers' Flux pipelines: ``linspace(1, 1/N, N)``, shifted dynamically
    (``mu`` linear in the image's token count) or by the config's fixed ``shift``."""
    sigmas = np.linspace(1.0, 1.0 / steps, steps, dtype=np.float64)
    if config.get("use_dynamic_shifting"):
        lo, hi = float(config.get("base_image_seq_len", 256)), float(config.get("max_image_seq_len", 4096))
        b0, b1 = float(config.get("base_shift", 0.5)), float(config.get("max_shift", 1.15))
        mu = image_tokens * (b1 - b0) / (hi - lo) + b0 - (b1 - b0) / (hi - lo) * lo
        sigmas = math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
    else:
        shift = float(config.get("shift", 1.0))
        sigmas = shift * sigmas / (1.0 + (shift - 1.0) * sigmas)
    return [float(s) for s in sigmas]


__all__ = ["flow_sigma", "flow_step_sigmas", "alphas_cumprod", "ddim_timesteps", "ddim_step_sigmas", "reference_sigma", "edit_start",
           "PureNoiseStart", "REFERENCE_BETAS"]
