"""Where in denoising an asset's LoRA should act: the measurement behind ``lora_window: auto``.

A concept asset's denoiser LoRA does two things at different noise levels: early (high t/T) it moves the
*layout* (where objects are: a hue asset trained on a centred circle pulls objects to the centre), late it
adds the *appearance* it learned (the exact hue). :func:`measure` asks the trained asset directly: for noise
levels ``t/T`` = 0.05, 0.15, ..., 0.95 it noises each training latent (fixed noise), predicts the clean latent
with the asset's denoiser LoRA on and off (its embeddings and text-encoder LoRA on in both), and splits the
difference ``D`` into

* appearance: the spatial mean of ``D`` per channel (a global shift: colour, brightness);
* layout: ``D`` pooled to 4 x 4 cells, minus its mean (a shift that differs across the image: things move).

The window is ``[0, end]`` with ``end`` the highest ``t/T`` up to which appearance dominates layout at every
level (layout / appearance <= 1): the LoRA then acts only where it adds what the asset is, not where it moves
things. When layout dominates even at the lowest level the asset's LoRA *is* about layout (a place, a size):
no window is proposed. The profile is kept in the asset's card, so the choice can be checked and redone.
Works on every family (the schedule and the prediction come from it).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

LEVELS = tuple(round(0.05 + 0.1 * i, 2) for i in range(10))
DOMINANCE = 1.0


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
    end = None
    for row in profile:
        if row["layout"] > DOMINANCE * row["appearance"]:
            break
        end = row["t"]
    return {"window": None if end is None else [0.0, end], "how": "auto", "levels": list(LEVELS),
            "profile": profile,
            "effect": ("the denoiser LoRA acts only for t/T <= %s: above that it moved the layout more than it "
                       "added the asset's appearance" % end) if end is not None else
                      "no window: the denoiser LoRA moves the layout at every noise level (the asset is about it)"}


__all__ = ["measure", "split", "LEVELS"]
