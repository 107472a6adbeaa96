"""The GPU benchmark's caspec side of sections 1 and 2: caspec's ``sdedit`` as its edit step calls it, and one
timed run of caspec's trainer (:func:`caspec.train.train_concept`, phase 1 alone or phase 2 alone).

On CUDA caspec's modules are in the benchmark ``dtype`` (default bf16; VAE fp32) with
:class:`~caspec.train.TrainConfig`'s ``mixed_precision`` (default ``no``); on the CPU everything is fp32.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .inputs import make_items, make_words
from .measure import Probe, free_memory, peak_memory
from .models import Models
from .settings import BenchSettings


def edit_batch_size(pipe: Any) -> int:
    """The batch size caspec's edit step samples with on ``pipe``'s device."""
    from caspec.models.sampling import default_batch_size

    return default_batch_size(pipe)


def caspec_sdedit(pipe: Any, root: Any, prompts: list[str], seeds: list[int], *, strength: float, steps: int,
                  guidance_scale: float, resolution: int, batch_size: int) -> list[Any]:
    """One SDEdit variation of ``root`` per prompt through :func:`caspec.models.sampling.sdedit`."""
    from caspec.models.sampling import sdedit

    return sdedit(pipe, [root] * len(prompts), prompts, seeds, strength=strength, steps=steps,
                  guidance_scale=guidance_scale, negative_prompt="", resolution=resolution, batch_size=batch_size)


def caspec_train_run(models: Models, s: BenchSettings, phase: int, batch: int, work: Path) -> dict[str, Any]:
    """One timed run of caspec's trainer, ``phase`` alone at ``batch`` (no checkpoints, no previews), its
    steps stamped by a :class:`~.measure.Probe` through the ``progress`` callback."""
    from caspec.train import TrainConfig, train_concept

    total = s.train_warmup + s.train_steps + 1
    free_memory(models.device)
    t0 = time.perf_counter()
    pipe = models.pipe()
    cfg = TrainConfig(phase1_steps=total if phase == 1 else 0, phase2_steps=total if phase == 2 else 0,
                      batch_size=batch, checkpoint_every=0, preview_every=0, seed=s.seed,
                      mixed_precision=s.mixed_precision)
    probe = Probe(models.device, total)
    out = Path(tempfile.mkdtemp(prefix=f"caspec-p{phase}-b{batch}-", dir=work))
    try:
        train_concept(pipe, make_words(s.train_images), make_items(s.train_images, models.resolution), cfg,
                      out / "asset", checkpoint_dir=out / "checkpoint", preview_prompts=[], progress=probe)
    finally:
        probe.close()
    result = probe.summary(batch, s.train_warmup, s.train_steps)
    result["peak_mem_bytes"] = peak_memory(models.device)
    result["run_s"] = time.perf_counter() - t0
    del pipe
    shutil.rmtree(out, ignore_errors=True)
    free_memory(models.device)
    return result
