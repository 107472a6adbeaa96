"""Where in denoising an asset's LoRA should act: the measurement behind ``lora_window: auto``.

A concept asset's denoiser LoRA does two things at different noise levels: early (high t/T) it moves the
*layout* (where objects are: a hue asset trained on a centred circle pulls objects to the centre), late it
adds the *appearance* it learned (the exact hue). :func:`measure` asks the trained asset directly: for noise
levels ``t/T`` = 0.05, 0.15, ..., 0.95 it noises each training latent (fixed noise), predicts the clean latent
with the asset's denoiser LoRA on and off (its embeddings and text-encoder LoRA on in both), and splits the
difference ``D`` into

* appearance: the spatial mean of ``D`` per channel (a global shift: colour, brightness);
* layout: ``D`` pooled to 4 x 4 cells, minus its mean (a shift that differs across the image: things move).

The layout change is small and steady at low noise (the LoRA refines edges of what is there) and grows
steeply where the layout is decided. The window is ``[0, end]`` with ``end`` the highest ``t/T`` up to which
the layout change stays within :data:`GROWTH` times its median over the low-noise half (t/T <= 0.5): the LoRA
then acts only where it adds what the asset is, not where it moves things. When the layout change grows
already in the low-noise half, no window is proposed. The profile is kept in the asset's card, so the choice
can be checked and redone. Works on every family (the schedule and the prediction come from it).

Version :data:`VERSION` enters the key of a training that measures (``lora_window: auto``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

LEVELS = tuple(round(0.05 + 0.1 * i, 2) for i in range(10))
GROWTH = 2.0
VERSION = 2  # 2: the window closes where the layout change outgrows its low-noise median


def split(delta: torch.Tensor) -> tuple[float, float]:
    """``(layout, appearance)`` magnitudes of a clean-latent difference ``[B, C, h, w]``."""
    mean = delta.mean(dim=(2, 3), keepdim=True)
    cells = F.adaptive_avg_pool2d(delta, 4) - mean
    return float(cells.pow(2).mean().sqrt()), float(mean.pow(2).mean().sqrt())


@torch.no_grad()
def measure(pipe: Any, schedule: Any, latents: torch.Tensor, cond: Any, adapter: str, resolution: int,
            generator: torch.Generator) -> dict[str, Any]:
    """The layout / appearance profile of ``adapter``'s denoiser LoRA over :data:`LEVELS`, and the window."""
    from ..assets.format import set_lora_scale

    denoiser = pipe.denoiser
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device)
    profile = []
    try:
        for level in LEVELS:
            t = schedule.at(level, latents.shape[0]).to(latents.device)
            z_t, _ = schedule.noisy(latents, noise, t)
            x0 = []
            for scale in (1.0, 0.0):
                set_lora_scale(denoiser, adapter, scale)
                pred = pipe.kind.predict(pipe, z_t, t, cond, resolution).float()
                x0.append(schedule.clean(z_t, pred, t))
            layout, appearance = split(x0[0] - x0[1])
            profile.append({"t": level, "layout": round(layout, 6), "appearance": round(appearance, 6)})
    finally:
        set_lora_scale(denoiser, adapter, 1.0)
    end = window_end(profile)
    return {"window": None if end is None else [0.0, end], "how": "auto", "levels": list(LEVELS),
            "profile": profile, "version": VERSION,
            "effect": ("the denoiser LoRA acts only for t/T <= %s: above that its change of the layout grows past "
                       "%g times its low-noise level (it starts deciding where things are)" % (end, GROWTH))
            if end is not None else
            "no window: the denoiser LoRA's change of the layout grows already at low noise"}


def window_end(profile: list[dict[str, float]]) -> float | None:
    """The highest level up to which the layout change stays within ``GROWTH`` x its low-noise median."""
    import statistics

    low = [row["layout"] for row in profile if row["t"] <= 0.5]
    if not low:
        return None
    limit = GROWTH * statistics.median(low)
    end = None
    for row in profile:
        if row["layout"] > limit:
            break
        end = row["t"]
    return end


__all__ = ["measure", "split", "window_end", "LEVELS", "GROWTH", "VERSION"]
