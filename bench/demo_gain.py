"""Benchmark: does `make demo` show the method's gain? (issue 28, item 7; 2-core CPU, about 80 s)

Runs ``specs/toy-demo.yaml`` in a fresh folder and store, then reads every composed image with the exact
attribute reader of the shapes world: per image, the distance of its square from the root's spot and its
colour, for the concept images ("a red <myspot>") and their plain-prompt twins ("a red square", the same
seed, no asset: the reference, drawn in the same run). Prints a markdown table and the eval step's CLIP
metrics (toy CLIP) for both.

Usage: python bench/demo_gain.py [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from caspec.toyworld import read

ROOT = Path(__file__).resolve().parent.parent
NEAR = 0.1  # of the image width: "on the root's spot"


def run_demo(folder: Path) -> float:
    shutil.copytree(ROOT / "specs" / "toy-concepts", folder / "toy-concepts")
    spec = Path(shutil.copy(ROOT / "specs" / "toy-demo.yaml", folder))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "caspec", "run", str(spec)], check=True, cwd=folder)
    return time.perf_counter() - start


def measure(out: Path) -> dict:
    root = read(Image.open(next((out / "spot").glob("*.png"))))
    concept = sorted((out / "new-colors").glob("p*-c?.png"))
    rows = {}
    for name, files in (("plain prompt (no asset)", [p.with_name(p.stem + "-plain.png") for p in concept]),
                        ("concept <myspot>", concept)):
        readings = [read(Image.open(p)) for p in files]
        wanted = [p.name.split("-")[0] for p in concept]  # p0/p1/p2: red, cyan, yellow
        colours = {"p0": "red", "p1": "cyan", "p2": "yellow"}
        dist = [math.hypot(r.x - root.x, r.y - root.y) for r in readings]
        rows[name] = {"n": len(dist), "near": sum(d <= NEAR for d in dist), "median": sorted(dist)[len(dist) // 2],
                      "colour": sum(r.color_name == colours[w] for r, w in zip(readings, wanted)),
                      "square": sum(r.shape == "square" for r in readings)}
    metrics = json.loads((out / "quality" / "eval.json").read_text())
    rows["plain prompt (no asset)"]["clip"] = metrics["baselines"]["my-spot"]
    rows["concept <myspot>"]["clip"] = metrics["groups"]["my-spot"]
    return rows


def table(rows: dict) -> str:
    lines = ["| images | on the root's spot (within 0.1) | median distance | new colour shown | square | "
             "prompt consistency | identity consistency |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        c = r["clip"]
        lines.append(f"| {name} | {r['near']}/{r['n']} | {r['median']:.3f} | {r['colour']}/{r['n']} | "
                     f"{r['square']}/{r['n']} | {c['prompt_consistency']:.3f} | {c['identity_consistency']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="run in this (new) folder and keep it")
    args = ap.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="caspec-demo-gain-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        seconds = run_demo(folder)
        print(table(measure(folder / "out" / "toy-demo")))
        print(f"\nwhole demo from an empty store: {seconds:.1f} s")
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
