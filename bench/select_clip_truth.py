"""Benchmark: does `select: by: clip` keep what a person would? Measured on the shapes world (issue 12).

Fresh renders of the toy world are edited by SDEdit with the `toy` model, each with several edit prompts
(two colour edits, one shape edit, and a no-op: the source's own prompt) and several candidates each. The
exact attribute reader (:mod:`caspec.toyworld.reader`) says which candidates are right: the edit shows (the
new colour or shape) and the rest is kept (the other attribute, and the place within
``caspec.toyworld.measure.POSITION_TOL``). A no-op is never a right edit.

Each source image is one selection (its prompts x candidates), scored with the toy CLIP two ways:

* old: ``text + identity`` (caspec's score before issue 12; its thresholds were unset by default);
* new: caspec's :func:`caspec.ops.select_clip.decide` on :func:`caspec.metrics.edit_score.score_candidate`
  (directional similarity, no-op refusal, ``min_direction``/``min_relative_direction`` at their defaults),

kept either by the thresholds alone (every passing candidate) or by ``top_k`` (the best K of a source).
Reported per strength: precision of the kept candidates (target >= 95%), recall (right candidates kept over
right candidates made; at most K / right ones with ``top_k``), and how often a no-op edit is kept while a
real edit of the same selection passes (target: never).

Usage: python bench/select_clip_truth.py [--scenes 16] [--candidates 3] [--strengths 0.86,0.6] [--steps 30]
       [--seed 2024] [--threads 1] [--top-k 2,6] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

TARGET_PRECISION = 0.95


@dataclass
class Cand:
    """One SDEdit candidate: its source index, kind of edit, whether the reader says it is right, scores."""

    source: int
    kind: str  # color | shape | noop
    prompt: str
    right: bool
    old: float = 0.0
    new: Any = None  # EditScore


def _read(image):
    from caspec.toyworld.reader import read

    try:
        return read(image)
    except ValueError:
        return None


def _truth(scene, image, kind: str, new: str | None) -> bool:
    """The reader's verdict: the asked-for attribute shows, the other one and the place are kept."""
    from caspec.toyworld.measure import POSITION_TOL
    from caspec.toyworld.render import color_name

    o = scene.objects[0]
    r = _read(image)
    if r is None or kind == "noop":
        return False
    placed = math.hypot(r.x - o.x, r.y - o.y) <= POSITION_TOL
    if kind == "color":
        return r.color_name == new and r.shape == o.shape and placed
    return r.shape == new and r.color_name == color_name(o.hue, o.sat, o.val) and placed


def _edits(scene, rng) -> list[tuple[str, str, str | None]]:
    """(prompt, kind, new value): two colour edits, a shape edit, and the source's own prompt (a no-op)."""
    from caspec.toyworld.data import caption_parts
    from caspec.toyworld.measure import COLORS
    from caspec.toyworld.render import SHAPES

    o = scene.objects[0]
    color = caption_parts(scene)["color"]
    c1, c2 = (str(c) for c in rng.choice([c for c in COLORS if c != color], 2, replace=False))
    shape = str(rng.choice([s for s in SHAPES if s != o.shape]))
    return [(f"a {c1} {o.shape}", "color", c1), (f"a {c2} {o.shape}", "color", c2),
            (f"a {color} {shape}", "shape", shape), (f"a {color} {o.shape}", "noop", None)]


def make_candidates(pipe, clip, *, scenes: int, candidates: int, strength: float, steps: int, seed: int) -> list[Cand]:
    """Render, edit, read and score: every candidate of every source image."""
    from caspec.metrics.edit_score import score_candidate
    from caspec.models.sampling import sdedit
    from caspec.toyworld.data import caption_parts, sample_toy_scene
    from caspec.toyworld.render import render

    rng = np.random.default_rng(seed)
    jobs = []  # (source index, scene, source image, source prompt, prompt, kind, new)
    for n in range(scenes):
        scene = sample_toy_scene(rng)
        source_prompt = f"a {caption_parts(scene)['color']} {scene.objects[0].shape}"
        image = render(scene)
        for prompt, kind, new in _edits(scene, rng):
            jobs += [(n, scene, image, source_prompt, prompt, kind, new)] * candidates
    seeds = [seed * 1_000_003 + i for i in range(len(jobs))]
    out = sdedit(pipe, [j[2] for j in jobs], [j[4] for j in jobs], seeds, strength=strength, steps=steps,
                 guidance_scale=7.5)
    cand_emb = clip.embed_images(out)
    src_emb = clip.embed_images([render(s) for s in _scenes(jobs)])
    texts = sorted({j[3] for j in jobs} | {j[4] for j in jobs})
    text_emb = clip.embed_texts(texts)
    row = {t: i for i, t in enumerate(texts)}
    cands = []
    for i, (n, scene, _img, sp, prompt, kind, new) in enumerate(jobs):
        c, s, t, q = cand_emb[i], src_emb[n], text_emb[row[prompt]], text_emb[row[sp]]
        cands.append(Cand(n, kind, prompt, _truth(scene, out[i], kind, new), old=float(c @ t) + float(c @ s),
                          new=score_candidate(c, source=s, prompt=t, source_prompt=q)))
    return cands


def _scenes(jobs) -> list:
    seen: dict[int, Any] = {}
    for j in jobs:
        seen.setdefault(j[0], j[1])
    return [seen[k] for k in sorted(seen)]


def select_old(group: list[Cand], top_k: int | None) -> tuple[list[int], list[bool]]:
    """The old selection: ranked by text + identity, no thresholds (its defaults): (kept, passed)."""
    ranked = sorted(range(len(group)), key=lambda i: (-group[i].old, i))
    return (ranked if top_k is None else ranked[:top_k]), [True] * len(group)


def select_new(group: list[Cand], top_k: int | None) -> tuple[list[int], list[bool]]:
    """caspec's selection now, with its default thresholds."""
    from caspec.ops.select_clip import Settings, decide

    d = decide([c.new for c in group], None, Settings(top_k=top_k, min_keep=0), sources=[str(c.source) for c in group])
    return d.kept, d.passed


def measure(cands: list[Cand], select, top_k: int | None) -> dict[str, Any]:
    """Precision, recall and no-op keeps of ``select`` over every source's selection."""
    kept_n = right_kept = right_all = noop_steps = noop_kept = steps = 0
    for n in sorted({c.source for c in cands}):
        group = [c for c in cands if c.source == n]
        kept, passed = select(group, top_k)
        steps += 1
        right_all += sum(c.right for c in group)
        kept_n += len(kept)
        right_kept += sum(group[i].right for i in kept)
        noops = sum(group[i].kind == "noop" for i in kept)
        noop_kept += noops
        real_passed = any(p and c.kind != "noop" for c, p in zip(group, passed))
        noop_steps += bool(noops and real_passed)
    return {"kept": kept_n, "precision": right_kept / kept_n if kept_n else None,
            "recall": right_kept / right_all if right_all else None, "noop_kept": noop_kept,
            "selections": steps, "selections_keeping_a_noop_beside_passing_edits": noop_steps}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| strength | selection | score | kept | precision | recall | no-op kept (selections) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        for regime, by in r["regimes"].items():
            for score in ("old", "new"):
                m = by[score]
                miss = "" if m["precision"] is None or m["precision"] >= TARGET_PRECISION else " (missed)"
                lines.append(f"| {r['strength']} | {regime} | {score} | {m['kept']} | {_pct(m['precision'])}{miss} | "
                             f"{_pct(m['recall'])} | {m['noop_kept']} ({m['selections_keeping_a_noop_beside_passing_edits']}"
                             f"/{m['selections']}) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenes", type=int, default=16)
    ap.add_argument("--candidates", type=int, default=3)
    ap.add_argument("--strengths", default="0.86,0.6")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (output bytes depend on it)")
    ap.add_argument("--top-k", default="2,6", help="top_k values to measure besides thresholds alone")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from caspec.metrics.clip import ClipSpec, load_clip
    from caspec.toyworld.measure import toy_pipe

    t0 = time.time()
    pipe = toy_pipe()
    clip = load_clip(ClipSpec("caspec-toy-clip"))
    results = []
    for k, strength in enumerate(float(s) for s in args.strengths.split(",")):
        cands = make_candidates(pipe, clip, scenes=args.scenes, candidates=args.candidates, strength=strength,
                                steps=args.steps, seed=args.seed + k)
        regimes: dict[str, Any] = {"thresholds only": {"old": measure(cands, select_old, None),
                                                       "new": measure(cands, select_new, None)}}
        for top_k in (int(x) for x in args.top_k.split(",") if x):
            regimes[f"top_k {top_k}"] = {"old": measure(cands, select_old, top_k), "new": measure(cands, select_new, top_k)}
        real = [c for c in cands if c.kind != "noop"]
        results.append({"strength": strength, "candidates": len(cands), "real_edits": len(real),
                        "right": sum(c.right for c in real), "regimes": regimes})
        print(f"strength {strength}: {len(cands)} candidates, {sum(c.right for c in real)}/{len(real)} real edits "
              f"right by the reader ({time.time() - t0:.0f} s)", flush=True)
    info = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.threads}",
            "torch": torch.__version__, "args": vars(args), "seconds": round(time.time() - t0, 1)}
    print()
    print(table(results))
    print(f"\n{info['machine']}; {info['seconds']} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"info": info, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
