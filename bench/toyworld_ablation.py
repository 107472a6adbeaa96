"""Benchmark: issue 17, part 3, the paper's ablation (its Fig. 6) on the `toy` shapes world (2-core CPU, ~40 min).

Runs ``specs/toy-ablation.yaml`` with caspec (the spot root -> 16 SDEdit colour variations -> nested,
balanced subsets of 1, 3, 5, 8 and 16 -> two-phase training at three step counts, plus textual inversion
alone and LoRA DreamBooth on the root -> compose with new colour words), then reads every image with the
exact reader and scores it with the toy CLIP (:func:`caspec.toyworld.claims.ablation`), and plots
Fig. 6's grid of samples beside the measures.

The spec runs from a copy in the store's folder: its review manifests name candidates by id and are filled
in by the run, which must not touch the committed ones.

Usage: python bench/toyworld_ablation.py [--store DIR] [--json PATH] [--plot PATH]
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from caspec.metrics.clip import ClipSpec, load_clip
from caspec.spec.load import load_spec
from caspec.store import open_store
from caspec.toyworld.claims import ABLATION_BASELINES, ABLATION_STEPS, NEW_COLORS, VARIATIONS, ablation, step_images

from experiment_run import report, run_timed  # bench/: the drivers' shared run-and-report

SPECS = Path(__file__).resolve().parent.parent / "specs"


def _copy_spec(work: Path) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    for folder in ("toy-concepts", "toy-ablation"):
        shutil.copytree(SPECS / folder, work / folder, dirs_exist_ok=True)
    shutil.copyfile(SPECS / "toy-ablation.yaml", work / "toy-ablation.yaml")
    return work / "toy-ablation.yaml"


def _cell(r: dict) -> str:
    e = r["position_error"]
    err = f"{e['mean']:.3f} / {e['median']:.3f} / {e['within']:.0%}" if e else "n/a"
    return (f"{err} | {r['color_followed']:.0%} | {r.get('prompt_consistency', float('nan')):.3f} | "
            f"{r.get('identity_consistency') or float('nan'):.3f}")


def tables(result: dict) -> str:
    lines = ["| variations | steps | position error: mean / median / within 0.1 | new colour shown | "
             "prompt consistency | identity consistency |", "|---|---|---|---|---|---|"]
    for n in VARIATIONS:
        for s, label in ABLATION_STEPS.items():
            lines.append(f"| {n}{' (root alone)' if n == 1 else ''} | {label} | {_cell(result['grid'][f'n{n}-{s}'])} |")
    for key, label in ABLATION_BASELINES.items():
        lines.append(f"| {label} | - | {_cell(result['baselines'][key])} |")
    return "\n".join(lines)


def plot(loaded, store, result: dict, path: Path) -> Path:
    """Fig. 6: a sample per new colour for every cell (rows: variations, columns: steps), and the measures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    steps = list(ABLATION_STEPS)
    fig = plt.figure(figsize=(4 + 2.4 * len(steps), 6.5))
    grid = fig.add_gridspec(len(VARIATIONS), len(steps) + 2, width_ratios=[1] * len(steps) + [1.6, 1.6])
    for i, n in enumerate(VARIATIONS):
        for j, s in enumerate(steps):
            images = step_images(loaded, store, f"make-n{n}-{s}")
            per = len(images) // len(NEW_COLORS)
            strip = np.concatenate([np.asarray(images[c * per][0]) for c in range(len(NEW_COLORS))], axis=1)
            ax = fig.add_subplot(grid[i, j])
            ax.imshow(strip, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(f"{n} var.", fontsize=9)
            if i == 0:
                ax.set_title(ABLATION_STEPS[s], fontsize=9)
    err_ax = fig.add_subplot(grid[:, len(steps)])
    div_ax = fig.add_subplot(grid[:, len(steps) + 1])
    for s in steps:
        rows = [result["grid"][f"n{n}-{s}"] for n in VARIATIONS]
        err_ax.plot(VARIATIONS, [r["position_error"]["mean"] for r in rows], marker="o", label=ABLATION_STEPS[s])
        div_ax.plot(VARIATIONS, [r["color_followed"] for r in rows], marker="o", label=ABLATION_STEPS[s])
    for key, style in (("ti", ":"), ("db", "-."), ("plain", "--")):
        r = result["baselines"][key]
        err_ax.axhline(r["position_error"]["mean"], ls=style, c="grey", label=key)
        div_ax.axhline(r["color_followed"], ls=style, c="grey", label=key)
    for ax, title in ((err_ax, "position error vs root (mean)"), (div_ax, "new colour shown (diversity)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(VARIATIONS, [str(n) for n in VARIATIONS])
        ax.set_xlabel("training variations")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("spot concept: samples \"a red / cyan / yellow <A1>\" (seed 0) and reader measures", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default="/tmp/caspec-ablation", help="store directory; the spec runs from a copy beside it")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    store_dir = Path(args.store)
    spec = _copy_spec(store_dir.parent / f"{store_dir.name}-spec")
    loaded = load_spec(spec)
    store = open_store(store_dir)
    seconds = run_timed(loaded, store)
    if seconds is None:
        return 1
    result = ablation(loaded, store, load_clip(ClipSpec(model="caspec-toy-clip")))
    report(tables(result), result, seconds, args.json)
    if args.plot:
        plot(loaded, store, result, Path(args.plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
