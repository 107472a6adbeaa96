"""The GPU benchmark's paired sections: each puts caspec's side against its reference on the same modules and
computes the caspec/reference ratios from the numbers of the same run.

1. :func:`bench_sdedit`: 8 variations of one root image (50 DDIM steps, strength 0.86, CFG 7.5), caspec's
   :func:`caspec.models.sampling.sdedit` (batch size as the edit step uses it) against diffusers'
   ``StableDiffusionImg2ImgPipeline``; one warm-up call each, then the median wall time over the repeats
   (the order of the two sides alternating).
2. :func:`bench_train`: samples/s, step time, peak memory, counted FLOPs and losses of caspec's trainer
   (phase 1 alone and phase 2 alone, at each batch size) against :class:`~.reference.ReferenceTI` and
   :class:`~.reference.ReferenceLoRA`.
4. :func:`bench_matmul`: the measured matrix-multiply rate (bf16 on CUDA, fp32 on the CPU); each training
   row's effective TFLOP/s and its fraction of that rate are derived in :mod:`.report`.

(Section 3, one concept end to end, is caspec's alone: :mod:`.e2e`.)
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from .caspec_side import caspec_sdedit, caspec_train_run, edit_batch_size
from .inputs import edit_prompts, edit_seeds, make_root
from .measure import free_memory, median, sync
from .models import Models
from .reference import img2img_pipeline, img2img_variations, reference_train_run
from .report import error_record
from .settings import BenchSettings


def bench_sdedit(models: Models, s: BenchSettings) -> dict[str, Any]:
    """Section 1: caspec's ``sdedit`` vs diffusers' img2img pipeline, same modules, same dtype."""
    free_memory(models.device)
    pipe = models.pipe()
    ref = img2img_pipeline(models, pipe)
    n, res = s.sdedit_variations, models.resolution
    root = make_root(res)
    prompts = edit_prompts(n)
    seeds = edit_seeds(root, prompts, s.seed)
    batch_size = edit_batch_size(pipe)

    def caspec_side() -> list[Any]:
        return caspec_sdedit(pipe, root, prompts, seeds, strength=s.sdedit_strength, steps=s.sdedit_steps,
                             guidance_scale=s.sdedit_guidance, resolution=res, batch_size=batch_size)

    def reference_side() -> list[Any]:
        return img2img_variations(ref, root, prompts, seeds, strength=s.sdedit_strength, steps=s.sdedit_steps,
                                  guidance_scale=s.sdedit_guidance)

    sides = {"caspec": caspec_side, "reference": reference_side}
    times: dict[str, list[float]] = {"caspec": [], "reference": []}
    warm: dict[str, float] = {}
    for name, fn in sides.items():  # warm-up (first call: kernels, allocator)
        sync(models.device)
        t0 = time.perf_counter()
        images = fn()
        sync(models.device)
        warm[name] = time.perf_counter() - t0
        if len(images) != n:
            raise RuntimeError(f"{name} made {len(images)} images, {n} expected")
    for r in range(s.sdedit_repeats):
        order = ("caspec", "reference") if r % 2 == 0 else ("reference", "caspec")
        for name in order:
            sync(models.device)
            t0 = time.perf_counter()
            sides[name]()
            sync(models.device)
            times[name].append(time.perf_counter() - t0)
    out: dict[str, Any] = {"variations": n, "steps": s.sdedit_steps, "strength": s.sdedit_strength,
                           "guidance_scale": s.sdedit_guidance, "denoising_steps": int(s.sdedit_steps * s.sdedit_strength),
                           "caspec_batch_size": batch_size, "repeats": s.sdedit_repeats}
    for name in sides:
        med = median(times[name])
        out[name] = {"runs_s": times[name], "median_s": med, "warmup_s": warm[name], "images_per_s": n / med}
    out["ratio_images_per_s"] = out["caspec"]["images_per_s"] / out["reference"]["images_per_s"]
    pipe = ref = None  # the closures above hold them: release the modules before freeing memory
    free_memory(models.device)
    return out


def bench_train(models: Models, s: BenchSettings, work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Section 2: caspec's phase 1 / phase 2 against the reference patterns at each batch size."""
    rows = []
    for phase in (1, 2):
        for batch in s.train_batches:
            row: dict[str, Any] = {"phase": phase, "batch": batch,
                                   "reference_pattern": "textual_inversion.py" if phase == 1 else "train_dreambooth_lora.py"}
            for side in ("caspec", "reference"):
                try:
                    row[side] = (caspec_train_run(models, s, phase, batch, work) if side == "caspec"
                                 else reference_train_run(models, s, phase, batch))
                    log(f"train phase {phase} batch {batch} {side}: {row[side]['samples_per_s']:.3f} samples/s")
                except Exception as exc:  # noqa: BLE001 - one failed run must not lose the others
                    row[side] = error_record(exc)
                    log(f"train phase {phase} batch {batch} {side}: FAILED {row[side]['error']}")
                    free_memory(models.device)
            c, r = row["caspec"], row["reference"]
            ok = "error" not in c and "error" not in r
            row["ratio_samples_per_s"] = c["samples_per_s"] / r["samples_per_s"] if ok else None
            row["ratio_peak_mem"] = (c["peak_mem_bytes"] / r["peak_mem_bytes"]
                                     if ok and c["peak_mem_bytes"] and r["peak_mem_bytes"] else None)
            rows.append(row)
    return {"warmup_steps": s.train_warmup, "timed_steps": s.train_steps, "images": s.train_images,
            "caspec_dtype": s.dtype, "caspec_mixed_precision": s.mixed_precision,
            "reference_precision": s.ref_precision, "rows": rows}


def bench_matmul(device: Any, n: int, iters: int) -> dict[str, Any]:
    """Section 4 (first half): the measured matmul rate, bf16 on CUDA, fp32 on the CPU."""
    import torch

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn((n, n), device=device, dtype=dtype, generator=g)
    b = torch.randn((n, n), device=device, dtype=dtype, generator=g)
    for _ in range(3 if device.type == "cuda" else 1):
        torch.mm(a, b)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        torch.mm(a, b)
    sync(device)
    seconds = time.perf_counter() - t0
    del a, b
    return {"dtype": str(dtype).replace("torch.", ""), "n": n, "iters": iters, "seconds": seconds,
            "tflops": 2.0 * n ** 3 * iters / seconds / 1e12}
