"""Benchmark: compose throughput on `tiny` (CPU) — caspec's single loaded pipeline (every asset applied
once, per-prompt LoRA scales switched in place) against reloading the pipeline and the assets per prompt.

Usage: python bench/compose_throughput.py [--prompts N] [--steps S] [--repeats R] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image

from caspec.assets.format import apply_asset, load_asset, write_card
from caspec.models.load import load_pipeline
from caspec.models.sampling import txt2img
from caspec.ops.compose import prompt_scales, set_scales
from caspec.spec.models import ModelSpec
from caspec.train import PseudoWord, TrainConfig, train_concept

PROMPTS = ["a <robot1> in <style1>", "<style1> of a <robot1>", "a <robot1> on mars", "<style1> of a city"]


def make_assets(root: Path) -> list[Path]:
    folders = []
    for name, word, init, color in (("robot", "<robot1>", "robot", (200, 30, 30)), ("style", "<style1>", "style", (30, 30, 200))):
        pipe = load_pipeline(ModelSpec(), root, fresh=True)
        folder = root / name
        train_concept(pipe, [PseudoWord(word, init, "constant")], [(Image.new("RGB", (64, 64), color), word)],
                      TrainConfig(phase1_steps=2, phase2_steps=2, checkpoint_every=0), folder,
                      checkpoint_dir=root / f"ckpt-{name}", preview_prompts=[])
        write_card(folder, {"pseudo_words": [{"token": word, "init": init, "role": "constant"}]})
        folders.append(folder)
    return folders


def single_pipeline(root: Path, folders: list[Path], prompts: list[str], steps: int) -> float:
    start = time.perf_counter()
    pipe = load_pipeline(ModelSpec(), root, fresh=True)
    assets = [load_asset(f, name=f"asset{i}") for i, f in enumerate(folders)]
    for i, asset in enumerate(assets):
        apply_asset(pipe, asset, lora_scale=0.0, adapter_name=f"asset{i}")
    for j, prompt in enumerate(prompts):
        set_scales(pipe, prompt_scales(prompt, [a.tokens for a in assets], 0.8, 0.5, [None] * len(assets)))
        txt2img(pipe, [prompt], [j], steps=steps)
    return time.perf_counter() - start


def reload_per_prompt(root: Path, folders: list[Path], prompts: list[str], steps: int) -> float:
    start = time.perf_counter()
    for j, prompt in enumerate(prompts):
        pipe = load_pipeline(ModelSpec(), root, fresh=True)
        assets = [load_asset(f, name=f"asset{i}") for i, f in enumerate(folders)]
        scales = prompt_scales(prompt, [a.tokens for a in assets], 0.8, 0.5, [None] * len(assets))
        for i, (asset, scale) in enumerate(zip(assets, scales)):
            apply_asset(pipe, asset, lora_scale=scale, adapter_name=f"asset{i}")
        txt2img(pipe, [prompt], [j], steps=steps)
    return time.perf_counter() - start


def run_benchmark(prompts: int = 16, steps: int = 20, repeats: int = 3) -> dict:
    with tempfile.TemporaryDirectory(prefix="caspec-bench-compose-") as tmp:
        root = Path(tmp)
        folders = make_assets(root)
        texts = [PROMPTS[j % len(PROMPTS)] for j in range(prompts)]
        single_pipeline(root, folders, texts[:1], 2)  # warm-up (imports, allocator)
        reload_per_prompt(root, folders, texts[:1], 2)
        a, b = [], []
        for _ in range(repeats):
            a.append(prompts / single_pipeline(root, folders, texts, steps))
            b.append(prompts / reload_per_prompt(root, folders, texts, steps))
    med_a, med_b = statistics.median(a), statistics.median(b)
    return {"prompts": prompts, "steps": steps, "repeats": repeats, "single_images_per_s": a,
            "reload_images_per_s": b, "median_single": med_a, "median_reload": med_b, "ratio": med_a / med_b}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    import torch

    r = run_benchmark(args.prompts, args.steps, args.repeats)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); {args.prompts} prompts x 1 image, {args.steps} DDIM steps, "
          f"2 assets, median of {args.repeats}\n")
    print("| pattern | images/s (median) | min | max |\n|---|---|---|---|")
    print(f"| caspec: one pipeline, scales switched per prompt | {r['median_single']:.2f} | "
          f"{min(r['single_images_per_s']):.2f} | {max(r['single_images_per_s']):.2f} |")
    print(f"| reload pipeline + assets per prompt | {r['median_reload']:.2f} | "
          f"{min(r['reload_images_per_s']):.2f} | {max(r['reload_images_per_s']):.2f} |")
    print(f"\nratio single / reload: {r['ratio']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
