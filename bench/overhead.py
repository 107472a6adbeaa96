"""Benchmark: caspec's own overhead (not a test).

1. A fully cached `caspec run specs/demo.yaml` against a bare `python -c 'import torch, diffusers'`
   (what any diffusion tool pays first), both as whole processes, alternated, median of N.
2. `caspec plan` on a generated spec with 500 steps (whole process, and in-process planning alone).

Usage: python bench/overhead.py [-n RUNS]   (prints a markdown table for BENCHMARKS.md)
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASPEC = [sys.executable, "-m", "caspec"]


def timed(cmd: list[str], env: dict[str, str], ok=(0,)) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode not in ok:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr}")
    return elapsed


def big_spec(path: Path, n: int) -> None:
    """n steps: n//3 roots, each with an edit and a select."""
    lines = ["version: 1", "name: big", "model: tiny", "vars:", "  color: [red, green, blue]", "roots:"]
    k = n // 3
    lines += [f"  r{i}:\n    prompt: \"a robot number {i}\"\n    candidates: 2" for i in range(k)]
    lines.append("edits:")
    lines += [f"  e{i}:\n    from: r{i}\n    prompts: \"a {{{{ color }}}} robot {i}\"\n    strength: 0.86" for i in range(k)]
    lines.append("select:")
    lines += [f"  s{i}:\n    from: e{i % k}\n    count: 2" for i in range(n - 2 * k)]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=7)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="caspec-bench-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CASPEC_CACHE": str(work / "cache"), "PYTHONHASHSEED": "0"}
    try:
        shutil.copy(ROOT / "specs" / "demo.yaml", work / "demo.yaml")
        spec = str(work / "demo.yaml")
        subprocess.run(CASPEC + ["run", spec], env=env, capture_output=True)  # fills the store, pauses at review
        subprocess.run(CASPEC + ["review", spec, "--step", "picks", "--keep", "s0-p0-c0", "s0-p1-c1"], env=env, check=True, capture_output=True)
        subprocess.run(CASPEC + ["run", spec], env=env, check=True, capture_output=True)
        imports = [sys.executable, "-c", "import torch, diffusers"]
        cached, bare = [], []
        for _ in range(args.n):
            cached.append(timed(CASPEC + ["run", spec], env))
            bare.append(timed(imports, env))
        big = work / "big.yaml"
        big_spec(big, 500)
        plan_cli = [timed(CASPEC + ["plan", str(big)], env) for _ in range(args.n)]
        sys.path.insert(0, str(ROOT))
        from caspec.plan.graph import make_plan
        from caspec.spec.load import load_spec
        from caspec.store import open_store

        inproc = []
        for _ in range(args.n):
            t = time.perf_counter()
            make_plan(load_spec(big), open_store(work / "big-store"))
            inproc.append(time.perf_counter() - t)
        med = statistics.median
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; median of {args.n}\n")
        print("| measurement | median s | min s | max s |")
        print("|---|---|---|---|")
        for name, xs in [("cached `caspec run specs/demo.yaml` (whole process)", cached),
                         ("`python -c 'import torch, diffusers'` (whole process)", bare),
                         ("`caspec plan` on a 500-step spec (whole process)", plan_cli),
                         ("load + plan of the 500-step spec (in process)", inproc)]:
            print(f"| {name} | {med(xs):.3f} | {min(xs):.3f} | {max(xs):.3f} |")
        print(f"\ncached run minus bare imports: {med(cached) - med(bare):+.3f} s "
              f"(ratio cached/imports {med(cached) / med(bare):.2f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
