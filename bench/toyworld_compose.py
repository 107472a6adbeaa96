"""Benchmark: issue 26, assets from different trainings that compose, on the `toy` shapes world (2-core CPU).

Runs ``specs/toy-compose.yaml`` (the spot and hue assets of issue 17 part 4, augmented variants of the hue and
size assets, and compose rows with and without LoRA time windows, 36 shared seeds each), then reads every
image with the exact reader (:mod:`caspec.toyworld.compose_claims`) and prints one table per part and the
targets, each met or missed with its number.

Usage: python bench/toyworld_compose.py [--store DIR] [--json PATH]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from caspec.spec.load import load_spec
from caspec.store import open_store
from caspec.toyworld.compose_claims import ONE, THREE, TWO, measure, targets

from experiment_run import report, run_timed  # bench/: the drivers' shared run-and-report

SPEC = Path(__file__).resolve().parent.parent / "specs" / "toy-compose.yaml"


def _f(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def tables(result: dict) -> str:
    lines = ["**Two assets** (`a <hue> <spot>`: place within 0.1 of (0.30, 0.62) and hue 0.700 within 0.02; 36 "
             "shared seeds per row; disagree = seeds whose \"both kept\" differs from the same order's row "
             "without options)", "",
             "| order | row | both kept | mean hue error | mean place error | in the centre | disagree |",
             "|---|---|---|---|---|---|---|"]
    for order in ("hf", "sf"):
        for name in TWO:
            r = result["two"][f"{order}-{name}"]
            lines.append(f"| {r['order']} | {r['rule']} | {r['both_share']:.0%} | {_f(r['hue_error'])} | "
                         f"{_f(r['place_error'], '.3f')} | {r['centre']}/{r['images']} | {r['disagree']} |")
    lines += ["", "**Three assets** (the spot's place, hue 0.700, size 0.56 within 0.03, a square)", "",
              "| row | all four | place | hue | size | square | in the centre |", "|---|---|---|---|---|---|---|"]
    for sid in THREE:
        r = result["three"][sid]
        lines.append(f"| {r['rule']} | {r['all_count']}/{r['images']} | {r['place']:.0%} | {r['hue']:.0%} | "
                     f"{r['size']:.0%} | {r['square']:.0%} | {r['centre']}/{r['images']} |")
    lines += ["", "**One asset on new shapes** (hue within 0.02)", "",
              "| hue asset | triangle | ring | mean error (triangle / ring) |", "|---|---|---|---|"]
    for sid in ONE:
        r = result["one"][sid]
        lines.append(f"| {r['rule']} | {r['triangle']['within']:.0%} | {r['ring']['within']:.0%} | "
                     f"{_f(r['triangle']['mean_error'])} / {_f(r['ring']['mean_error'])} |")
    lines += ["", "**Targets**", ""]
    lines += [f"- {'met' if ok else 'MISSED'}: {what}; {numbers}" for what, ok, numbers in targets(result)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=None, help="store folder (default: the spec's .caspec/)")
    ap.add_argument("--json", default=None, help="also write the measures as JSON")
    args = ap.parse_args()
    loaded = load_spec(SPEC)
    store = open_store(Path(args.store) if args.store else loaded.dir / ".caspec")
    seconds = run_timed(loaded, store)
    if seconds is None:
        raise SystemExit(1)
    result = measure(loaded, store)
    report(tables(result), result, seconds, args.json)


if __name__ == "__main__":
    main()
