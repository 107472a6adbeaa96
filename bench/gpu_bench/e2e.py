"""The GPU benchmark's section 3: one concept end to end as ``caspec run`` does it, timed part by part.

A pipe for sampling, 8 SDEdit candidates, CLIP scores (random-weight CLIP: timing only) and caspec's
select-clip decision (:func:`caspec.ops.select_clip.decide`), a fresh pipe, two-phase training at batch 4
(checkpoints and end-of-training previews at caspec's defaults), the asset written (and read back) in
caspec's asset format. The run calls it twice in the process: ``cold`` (first, before any other section,
right after the models are built) and ``warm`` (last). With fewer steps than 1000 + 1000 the time of
1000 + 1000 is also projected from the run's own mean step times.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .caspec_side import caspec_sdedit, edit_batch_size
from .inputs import edit_prompts, edit_seeds, make_root, make_words
from .measure import Probe, free_memory, peak_memory, sync
from .models import Models
from .settings import BenchSettings


def bench_e2e(models: Models, s: BenchSettings, work: Path, label: str) -> dict[str, Any]:
    """Section 3: one concept end to end (8 SDEdit candidates, CLIP selection, training, asset)."""
    from caspec.assets.format import load_asset, write_card
    from caspec.metrics.clip import ClipSpec, load_clip
    from caspec.metrics.edit_score import score_candidate
    from caspec.ops.select_clip import Settings, decide
    from caspec.train import TrainConfig, train_concept
    # loaded before the clock starts (caspec_sdedit and edit_seeds below import them lazily)
    import caspec.models.sampling  # noqa: F401
    import caspec.ops.images  # noqa: F401

    free_memory(models.device)
    dev = models.device
    parts: dict[str, float] = {}
    clock = time.perf_counter
    t_start = clock()

    t0 = clock()
    pipe = models.pipe()  # the shared sampling pipe (load_pipeline's cached one)
    parts["load_s"] = clock() - t0

    t0 = clock()
    n, res = s.e2e_candidates, models.resolution
    root = make_root(res)
    prompts = edit_prompts(n)
    seeds = edit_seeds(root, prompts, s.seed)
    candidates = caspec_sdedit(pipe, root, prompts, seeds, strength=s.sdedit_strength, steps=s.sdedit_steps,
                               guidance_scale=s.sdedit_guidance, resolution=res, batch_size=edit_batch_size(pipe))
    sync(dev)
    parts["sdedit_s"] = clock() - t0

    t0 = clock()
    clip = load_clip(ClipSpec(s.clip_model, pretrained="random"), device=str(dev))  # timing only: random weights
    emb = clip.embed_images(list(candidates) + [root])
    cand, src = emb[:n], emb[n]
    uniq = sorted(set(prompts))
    text_emb = clip.embed_texts(uniq)
    scores = [score_candidate(cand[i], source=src, prompt=text_emb[uniq.index(prompts[i])]) for i in range(n)]
    decision = decide(scores, (cand @ cand.T).tolist(), Settings(count=s.e2e_keep, min_direction=None,
                                                                  min_relative_direction=None),
                      [f"s0-p{i}-c0" for i in range(n)])
    if decision.problem:
        raise RuntimeError(f"CLIP selection: {decision.problem}")
    kept = sorted(decision.kept)
    parts["clip_s"] = clock() - t0

    t0 = clock()
    tpipe = models.pipe()  # load_pipeline(..., fresh=True): the trainer changes it
    parts["load_fresh_s"] = clock() - t0

    t0 = clock()
    k = len(kept)
    words = make_words(k)
    items = [(candidates[i], f"a photo of <dance1> <robot{j + 1}>") for j, i in enumerate(kept)]
    cfg = TrainConfig(phase1_steps=s.e2e_phase1_steps, phase2_steps=s.e2e_phase2_steps, batch_size=s.e2e_batch,
                      seed=s.seed, mixed_precision=s.mixed_precision)  # checkpoints and previews: caspec's defaults
    out = Path(tempfile.mkdtemp(prefix=f"e2e-{label}-", dir=work))
    probe = Probe(dev, flop_step=-1)
    summary = train_concept(tpipe, words, items, cfg, out / "asset", checkpoint_dir=out / "checkpoint",
                            progress=probe)
    sync(dev)
    parts["train_s"] = clock() - t0

    t0 = clock()
    write_card(out / "asset", {"name": "bench", "tokens": [w.token for w in words],
                               "captions": [c for _, c in items], "train": cfg.to_dict(),
                               "final_loss": summary.get("final_loss")})
    asset = load_asset(out / "asset")
    files = sorted(p.name for p in (out / "asset").iterdir())
    parts["save_s"] = clock() - t0
    total = clock() - t_start

    stamps, p1, p2 = probe.stamps, s.e2e_phase1_steps, s.e2e_phase2_steps
    loop_s = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
    p1_step = (stamps[p1 - 1] - stamps[0]) / (p1 - 1) if p1 >= 2 else None
    p2_step = (stamps[p1 + p2 - 1] - stamps[p1]) / (p2 - 1) if p2 >= 2 else None
    projected = None
    if p1_step is not None and p2_step is not None:
        projected = total - loop_s + 1000 * p1_step + 1000 * p2_step
    result = {
        "label": label, "total_s": total, "parts": parts, "phase1_steps": p1, "phase2_steps": p2,
        "batch": s.e2e_batch, "candidates": n, "kept": [f"s0-p{i}-c0" for i in kept],
        "clip_model": s.clip_model, "train_loop_s": loop_s, "train_outside_loop_s": parts["train_s"] - loop_s,
        "phase1_step_ms": None if p1_step is None else 1000 * p1_step,
        "phase2_step_ms": None if p2_step is None else 1000 * p2_step,
        "projected_1000_1000_s": projected,
        "initial_loss": summary.get("initial_loss"), "final_loss": summary.get("final_loss"),
        "losses": list(probe.losses), "asset_files": files, "asset_tokens": list(asset.tokens),
        "peak_mem_bytes": peak_memory(dev),
    }
    del pipe, tpipe, clip
    shutil.rmtree(out, ignore_errors=True)
    free_memory(dev)
    return result
